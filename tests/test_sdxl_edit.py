"""Imagic on SDXL, end to end on a tiny SDXL-structured checkpoint (tests/tiny.py) edited at 32 px: the packed
(context, pooled) embedding reaches the UNet whole and both parts get gradients, the size/crop conditioning comes
from the input and is recorded, an empty negative prompt is zeros, an interrupted edit resumes to the same bytes,
the LoRA file has kohya's SDXL names, and every command runs on the file unchanged (`--resolution 32`)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from imagic import sdxl
from imagic.cli import main
from imagic.editor import Editor
from imagic.steps import denoising_loss
from tests.tiny import write_tiny_checkpoint

FAST = dict(embed_steps=6, finetune_steps=6, finetune_lr=1e-2, save_every=2)
MODEL = ["--device", "cpu", "--quiet", "--resolution", "32"]
FIT = ["--embed-steps", "3", "--finetune-steps", "3", "--save-every", "2"]
SAMPLE = ["--steps", "3"]
PROMPT = "a red square"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdxl_edit")
    ckpt = write_tiny_checkpoint(d / "tiny_xl.safetensors", "sdxl")
    img = Image.new("RGB", (48, 32), (20, 30, 200))  # landscape: the crop cuts 8 px on each side
    ImageDraw.Draw(img).ellipse([16, 6, 34, 24], fill=(220, 20, 20))
    img.save(d / "photo.png")
    return ckpt, d / "photo.png"


@pytest.fixture(scope="module")
def editor(files) -> Editor:
    return Editor.from_checkpoint(files[0], device="cpu", resolution=32, progress=False)


def test_embedding_is_context_and_pooled_packed(editor):
    e = editor.encode_text(PROMPT)
    cfg = editor.config
    assert e.shape == (1, 78, cfg.unet.context_dim)
    ids, ids2 = editor.model.tokenizer(PROMPT), editor.model.tokenizer2(PROMPT)
    with torch.no_grad():
        context, pooled = editor.text_encoder(ids, ids2)
    assert torch.equal(e[:, :77], context) and torch.equal(e[:, 77, :cfg.text2.projection_dim], pooled)
    assert not e[:, 77, cfg.text2.projection_dim:].any()


def test_packed_call_is_the_unet_called_like_the_original(editor, files):
    """VectorUNet(x, t, pack(context, pooled)) == unet(x, t, context, y) with y from the Conditioner, exactly."""
    sizes = editor.size_conditioning(files[1])
    ids, ids2 = editor.model.tokenizer(PROMPT), editor.model.tokenizer2(PROMPT)
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([400])
    with torch.no_grad():
        context, pooled = editor.text_encoder(ids, ids2)
        y = editor.text_encoder.vector(pooled, sizes["original_size"], sizes["crop_top_left"], sizes["target_size"])
        direct = editor.unet(x, t, context, y)
        packed = editor.conditioning.unet_call(sizes)(x, t, sdxl.pack(context, pooled))
    assert torch.equal(direct, packed)


def test_both_parts_reach_the_unet_and_get_gradients(editor, files):
    """Stage 1's loss on the packed embedding: every part the UNet reads (CLIP-L's and bigG's context channels,
    the pooled vector) gets a gradient; the padding after the pooled vector gets exactly none."""
    x0 = editor.encode_image(editor.prepare_image(files[1]))
    e = editor.encode_text(PROMPT).requires_grad_(True)
    denoising_loss(editor.conditioning.unet_call(), editor.schedule, x0, e, torch.Generator().manual_seed(1)
                   ).backward()
    width, pooled = editor.config.text.width, editor.config.text2.projection_dim
    g = e.grad[0]
    assert g[:77, :width].abs().sum() > 0 and g[:77, width:].abs().sum() > 0  # CLIP-L and bigG
    assert (g[77, :pooled] != 0).all()
    assert torch.equal(g[77, pooled:], torch.zeros_like(g[77, pooled:]))


def test_size_conditioning_comes_from_the_input_and_reaches_the_unet(editor, files):
    sizes = editor.size_conditioning(files[1])
    assert sizes == {"original_size": [32, 48], "crop_top_left": [0, 8], "target_size": [32, 32]}
    assert editor.size_conditioning(files[1], square="pad")["crop_top_left"] == [0, 0]
    assert editor.size_conditioning() == {"original_size": [32, 32], "crop_top_left": [0, 0],
                                          "target_size": [32, 32]}
    e, x, t = editor.encode_text(PROMPT), torch.randn(1, 4, 16, 16), torch.tensor([300])
    with torch.no_grad():
        a = editor.conditioning.unet_call(sizes)(x, t, e)
        b = editor.conditioning.unet_call(None)(x, t, e)
    assert not torch.equal(a, b)


def test_empty_negative_prompt_is_zeros(editor):
    assert not editor.conditioning.encode_negative("").any()
    assert torch.equal(editor.conditioning.encode_negative("blurry"), editor.encode_text("blurry"))


class _Interrupt(Exception):
    pass


def _same_edit(a: Path, b: Path) -> None:
    """Two run directories hold the same edit: every file equal, byte for byte, except that tensors may differ in
    the last bits and samples by one 8-bit level. This machine's float32 matmuls are not bit-reproducible across
    buffer addresses (MKL/oneDNN choose their code path by alignment): two identical fits in one process differed
    by one unit in the last place in a stage-2 loss here, and six Adam steps made that 1.5e-7 in the LoRA weights."""
    files = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name not in ("run.log", ".lock")}
    assert files == {p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name not in ("run.log", ".lock")}
    for f in sorted(files):
        x, y = (a / f).read_bytes(), (b / f).read_bytes()
        if x == y:
            continue
        if f.suffix == ".safetensors":
            tx, ty = load_file(a / f), load_file(b / f)
            assert tx.keys() == ty.keys(), f
            for k in tx:  # Adam's steps are ~lr; rounding moves them by far less than 1e-3 of that
                assert torch.allclose(tx[k], ty[k], rtol=1e-4, atol=FAST["finetune_lr"] * 1e-3), (f, k)
        elif f.suffix == ".png":
            px, py = (torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).int() for p in (a / f, b / f))
            assert (px - py).abs().max() <= 1, f
        elif f.suffix in (".json", ".csv"):  # loss records: the same numbers up to rounding
            nx, ny = (re.findall(r"-?\d+\.?\d*(?:e-?\d+)?", t.decode()) for t in (x, y))
            assert len(nx) == len(ny) and np.allclose(np.float64(nx), np.float64(ny), rtol=1e-5), f
        else:
            raise AssertionError(f"{f} differs")


@pytest.mark.parametrize("stage,at", [("stage 1", 3), ("stage 2", 4)])
def test_edit_resumes_to_the_same_result(editor, files, tmp_path, stage, at):
    """LoRA (the default) on the SDXL UNet; interrupted in a stage and resumed, the edit equals an uninterrupted
    one (`_same_edit`), and args.json records the size conditioning."""
    for name, interrupt in (("a", False), ("b", True)):
        out = tmp_path / name
        if interrupt:
            def stop(which, step, loss):
                if which.startswith(stage) and step == at:
                    raise _Interrupt
            with pytest.raises(_Interrupt):
                editor.fit(files[1], PROMPT, out=out, callback=stop, **FAST)
        run = editor.fit(files[1], PROMPT, out=out, **FAST)
        editor.sample(run, alpha=[0.0, 1.0], seeds=[0], steps=3, guidance_scale=3.0)
    _same_edit(tmp_path / "a", tmp_path / "b")
    args = json.loads((tmp_path / "b" / "args.json").read_text())
    assert args["size_conditioning"] == {"original_size": [32, 48], "crop_top_left": [0, 8],
                                         "target_size": [32, 32]}
    assert editor.load_run(tmp_path / "b").size_conditioning == args["size_conditioning"]
    lora = load_file(next((tmp_path / "b").glob("lora*.safetensors")))
    # kohya's SDXL names: lora_unet_ + the sgm module path (input_blocks_4_1_...), not diffusers' down_blocks
    assert lora and all(k.startswith("lora_unet_") for k in lora)
    assert any(k.startswith("lora_unet_input_blocks_") for k in lora)
    assert not any("down_blocks" in k for k in lora)


def test_full_fine_tuning_changes_the_sdxl_unet(editor, files):
    run = editor.fit(files[1], PROMPT, finetune="full", embed_steps=2, finetune_steps=2, finetune_lr=1e-3)
    base = editor.unet.state_dict()
    assert any(not torch.equal(run.finetuned[k], base[k]) for k in base)


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def test_every_command_runs_on_an_sdxl_file(files, tmp_path, capsys):
    ckpt, img = files
    assert "sdxl" in _run(["inspect", ckpt], capsys)
    run = tmp_path / "run"
    _run(["edit", "--ckpt", ckpt, "--image", img, "--prompt", PROMPT, "--out", run, "--alpha", "0", "1",
          *FIT, *SAMPLE, *MODEL], capsys)
    before = {p.name: p.read_bytes() for p in (run / "samples").iterdir()}
    # sample defaults to the run's resolution (32), not the file's native 1024
    _run(["sample", "--run", run, "--alpha", "0.5", "--steps", "3", "--device", "cpu", "--quiet"], capsys)
    after = {p.name: p.read_bytes() for p in (run / "samples").iterdir()}
    assert all(after[k] == v for k, v in before.items()) and len(after) == len(before) + 1
    with Image.open(run / "grid-2.png") as g:
        assert g.width < 200  # one 32 px cell plus labels, not a 1024 px one
    _run(["train", "--ckpt", ckpt, "--image", img, "--prompt", PROMPT, "--out", tmp_path / "t", *FIT, *MODEL], capsys)
    _run(["txt2img", "--ckpt", ckpt, "--prompt", PROMPT, "--out", tmp_path / "t2i", *SAMPLE, *MODEL], capsys)
    _run(["img2img", "--ckpt", ckpt, "--image", img, "--prompt", PROMPT, "--out", tmp_path / "i2i", *SAMPLE,
          *MODEL], capsys)
    for folder in ("t2i", "i2i"):
        images = list((tmp_path / folder).glob("*.png"))
        assert images and all(Image.open(p).size == (32, 32) for p in images)
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"image": str(img), "target_text": PROMPT, "alpha": [1.0]}) + "\n")
    _run(["batch", edits, "--ckpt", ckpt, "--out", tmp_path / "batch", *FIT, *SAMPLE, *MODEL], capsys)
    assert (tmp_path / "batch" / "summary.csv").is_file()


def test_a_resolution_the_model_cannot_take_is_one_line(files, capsys):
    ckpt, img = files
    code = main(["txt2img", "--ckpt", str(ckpt), "--prompt", PROMPT, "--out", "unused", "--resolution", "36",
                 "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "multiple of 8" in err and "Traceback" not in err
    assert not Path("unused").exists()
