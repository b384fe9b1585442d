"""The Imagic editor end to end on tiny random models: what each stage may change, that it lowers the loss,
gradients against diffusers, seeded determinism, run directories, resume after interruption, NaN handling."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from imagic.editor import Editor
from imagic.fileio import load_safetensors
from imagic.rundir import RunDir, RunError
from imagic.schedule import NoiseSchedule
from imagic.steps import denoising_loss
from imagic.training import NumericalError
from tests.helpers import read_png_metadata, rel_err
from tests.tiny import write_tiny_checkpoint

FAST = dict(embed_steps=6, embed_lr=2e-2, finetune_steps=6, finetune_lr=1e-2, save_every=3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", "sd1")


@pytest.fixture()
def editor(ckpt):
    return Editor.from_checkpoint(ckpt, device="cpu", progress=False)


@pytest.fixture(scope="module")
def image():
    img = Image.new("RGB", (40, 32), (20, 30, 200))
    ImageDraw.Draw(img).ellipse([12, 8, 28, 24], fill=(220, 20, 20))
    return img


def _unet_state(editor):
    return {k: v.clone() for k, v in editor.unet.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@torch.no_grad()
def fixed_loss(unet, schedule, x0, context, seed: int = 1234, n: int = 8) -> float:
    """The denoising loss averaged over a fixed set of (t, noise): a low-variance yardstick."""
    gen = torch.Generator().manual_seed(seed)
    return sum(float(denoising_loss(unet, schedule, x0, context, gen)) for _ in range(n)) / n


def _yardstick(editor, image, e):
    x0 = editor.encode_image(editor.prepare_image(image))
    return fixed_loss(editor.unet, editor.schedule, x0, e, n=16)


def test_stage1_changes_only_the_embedding_and_lowers_the_loss(editor, image):
    before = _unet_state(editor)
    run = editor.fit(image, "a red square", **{**FAST, "embed_steps": 25, "finetune_steps": 0})
    _assert_same_state(before, _unet_state(editor))
    assert not torch.equal(run.optimized_embedding, run.target_embedding)
    assert run.optimized_embedding.dtype == torch.float32
    assert _yardstick(editor, image, run.optimized_embedding) < _yardstick(editor, image, run.target_embedding)


def test_stage1_gradient_equals_diffusers(editor, image):
    """d loss / d e through our UNet equals the gradient through diffusers' UNet with the same weights."""
    from tests.test_unet import diffusers_twin

    theirs = diffusers_twin(editor.unet, "sd1")
    x0 = editor.encode_image(editor.prepare_image(image))
    grads = []
    for fn in (editor.unet, lambda x, t, c: theirs(x, t, encoder_hidden_states=c).sample):
        e = editor.encode_text("a red square").requires_grad_(True)
        denoising_loss(fn, editor.schedule, x0, e, torch.Generator().manual_seed(3)).backward()
        grads.append(e.grad)
    assert grads[0].abs().sum() > 0
    assert rel_err(grads[0], grads[1]) < 1e-4


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_stage2_changes_only_its_parameters_and_lowers_the_loss(editor, image, mode):
    before = _unet_state(editor)
    run = editor.fit(image, "a red square", finetune=mode, **{**FAST, "finetune_steps": 12,
                                                               "finetune_lr": 1e-2 if mode == "lora" else 1e-3})
    _assert_same_state(before, _unet_state(editor))  # the editor's base model is restored after training
    if mode == "lora":
        assert run.finetuned and all(".lora_" in k or k.endswith(".alpha") for k in run.finetuned)
    else:
        assert run.finetuned.keys() == before.keys()
        assert any(not torch.equal(run.finetuned[k], before[k]) for k in before)
    base_loss = _yardstick(editor, image, run.optimized_embedding)
    with editor.finetuned_model(run):
        tuned_loss = _yardstick(editor, image, run.optimized_embedding)
    assert tuned_loss < base_loss
    _assert_same_state(before, _unet_state(editor))


def test_same_seed_bit_identical_other_seed_differs(editor, image):
    a = editor.fit(image, "a red square", **FAST)
    b = editor.fit(image, "a red square", **FAST)
    c = editor.fit(image, "a red square", **{**FAST, "seed": 1})
    assert torch.equal(a.optimized_embedding, b.optimized_embedding)
    for k in a.finetuned:
        assert torch.equal(a.finetuned[k], b.finetuned[k])
    assert not torch.equal(a.optimized_embedding, c.optimized_embedding)


def test_loss_target_follows_prediction_type():
    """v models learn the velocity (the diffusers community Imagic port always uses the noise, which is wrong)."""
    x0 = torch.randn(1, 4, 8, 8)
    for kind in ("epsilon", "v"):
        sched = NoiseSchedule.linear(prediction_type=kind)
        gen = torch.Generator().manual_seed(0)
        t = torch.randint(0, 1000, (1,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        truth = noise if kind == "epsilon" else sched.velocity(x0, noise, t)
        oracle = lambda x, tt, c, truth=truth: truth  # noqa: E731
        assert denoising_loss(oracle, sched, x0, torch.zeros(1, 2, 3), torch.Generator().manual_seed(0)) < 1e-10


def test_run_directory_reload_samples_identically(editor, image, tmp_path):
    run = editor.fit(image, "a red square", out=tmp_path / "run", **FAST)
    live = editor.sample(run, alpha=[0.0, 1.0], seeds=[0, 1], steps=4)
    rd = RunDir(tmp_path / "run")
    for path in (rd.args, rd.input_image, rd.target_embedding, rd.optimized_embedding, rd.lora, rd.loss_csv(1),
                 rd.loss_csv(2), rd.loss_plot, rd.grid, rd.log_file):
        assert path.is_file(), path
    assert sorted(p.name for p in rd.samples.iterdir()) == \
        [f"seed{s}_alpha{a}_cfg7.5_steps4_eta0.png" for s in (0, 1) for a in (0, 1)]
    assert sorted(live.paths) == [(s, float(a)) for s in (0, 1) for a in (0, 1)] and live.grid_path == rd.grid
    assert not rd.resume_state(1).exists() and not rd.resume_state(2).exists()
    kohya, _ = load_safetensors(rd.lora)
    assert all(k.startswith("lora_unet_") for k in kohya)
    meta = read_png_metadata(rd.grid)
    assert meta["target_text"] == "a red square" and meta["layout"] == "rows=seeds, columns=alphas"
    fresh = Editor.from_checkpoint(editor.model.path, device="cpu", progress=False)
    again = fresh.sample(fresh.load_run(tmp_path / "run"), alpha=[0.0, 1.0], seeds=[0, 1], steps=4, save=False)
    for key, img in live.images.items():
        assert np.array_equal(np.asarray(img), np.asarray(again.images[key])), key
    assert live.grid.size == again.grid.size
    # An image does not depend on what else the call samples (decoded one at a time): one cell alone is the same.
    alone = fresh.sample(fresh.load_run(tmp_path / "run"), alpha=1.0, seeds=[1], steps=4, save=False)
    assert np.array_equal(np.asarray(alone.images[(1, 1.0)]), np.asarray(live.images[(1, 1.0)]))


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("stage,at", [("stage 1", 4), ("stage 2", 5)])
def test_resume_after_interruption_equals_uninterrupted(editor, image, tmp_path, stage, at):
    settings = {**FAST, "embed_steps": 8, "finetune_steps": 8}
    full = editor.fit(image, "a red square", out=tmp_path / "a", **settings)

    def stop(name, step, loss):
        if name.startswith(stage) and step == at:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        editor.fit(image, "a red square", out=tmp_path / "b", callback=stop, **settings)
    resumed = editor.fit(image, "a red square", out=tmp_path / "b", **settings)
    assert torch.equal(full.optimized_embedding, resumed.optimized_embedding)
    for k in full.finetuned:
        assert torch.equal(full.finetuned[k], resumed.finetuned[k]), k
    assert full.losses["stage1"] == resumed.losses["stage1"]
    assert full.losses["stage2"] == resumed.losses["stage2"]


def test_run_directory_guards(editor, image, tmp_path):
    editor.fit(image, "a red square", out=tmp_path / "run", **FAST)
    with pytest.raises(RunError, match="another edit"):
        editor.fit(image, "a blue star", out=tmp_path / "run", **FAST)
    with RunDir(tmp_path / "run"):
        with pytest.raises(RunError, match="another imagic process"):
            editor.fit(image, "a red square", out=tmp_path / "run", **FAST)
    with pytest.raises(RunError, match="not a run directory"):
        editor.load_run(tmp_path)


def test_nan_loss_stops_with_stage_and_step(editor, image, tmp_path):
    calls = {"n": 0}
    real = editor.unet.forward

    def poisoned(x, t, c):
        calls["n"] += 1
        out = real(x, t, c)
        return out * float("nan") if calls["n"] == 5 else out

    editor.unet.forward = poisoned
    try:
        with pytest.raises(NumericalError, match=r"stage 1: embedding: loss is nan at step 5"):
            editor.fit(image, "a red square", out=tmp_path / "run", **FAST)
    finally:
        del editor.unet.forward
    rd = RunDir(tmp_path / "run")
    assert rd.resume_state(1).exists() and not rd.optimized_embedding.exists()
    run = editor.fit(image, "a red square", out=tmp_path / "run", **FAST)  # resumes from step 3
    assert len(run.losses["stage1"]) == FAST["embed_steps"]


def test_bf16_precision_keeps_trainables_fp32(ckpt, image):
    ed = Editor.from_checkpoint(ckpt, device="cpu", precision="bf16", progress=False)
    assert next(ed.unet.parameters()).dtype == torch.bfloat16
    assert next(ed.vae.parameters()).dtype == torch.float32
    run = ed.fit(image, "a red square", **FAST)
    assert run.optimized_embedding.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in run.finetuned.values())
    assert all(np.isfinite(run.losses["stage1"])) and all(np.isfinite(run.losses["stage2"]))
    res = ed.sample(run, alpha=[1.0], seeds=[0], steps=3)
    assert res.images[(0, 1.0)].size == (32, 32)


def test_empty_prompt_and_bad_settings(editor, image):
    with pytest.raises(ValueError, match="empty"):
        editor.fit(image, "   ", **FAST)
    with pytest.raises(ValueError, match="finetune"):
        editor.fit(image, "a red square", finetune="dreambooth")


def test_settings_objects_and_keywords_are_the_same_edit(editor, image):
    """`Editor.fit(image, text, settings=FitSettings(...))` and `Editor.sample(run, SampleSettings(...))` are the
    keyword calls a notebook user types; a keyword given beside a settings object replaces that field."""
    from imagic.settings import FitSettings, SampleSettings

    by_object = editor.fit(image, "a red square", settings=FitSettings(**FAST))
    by_keywords = editor.fit(image, "a red square", **FAST)
    assert by_object.settings == by_keywords.settings == FitSettings(**FAST).resolved()
    assert torch.equal(by_object.optimized_embedding, by_keywords.optimized_embedding)
    s = SampleSettings(alpha=1.0, seeds=(0,), steps=3)
    a = editor.sample(by_object, s, save=False).images[(0, 1.0)]
    b = editor.sample(by_object, alpha=[1.0], seeds=[0], steps=3, save=False).images[(0, 1.0)]
    c = editor.sample(by_object, SampleSettings(steps=3), alpha=1.0, save=False).images[(0, 1.0)]
    assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(a), np.asarray(c))
    with pytest.raises(TypeError, match="unknown SampleSettings field"):
        editor.sample(by_object, alphas=[1.0])


def test_the_editor_enters_its_kernel_setting_and_plans_with_it(ckpt, image):
    """The kernel choice is the editor's setting, entered around each call (`kernels.use_setting`); "auto"
    leaves an enclosing `use_triton` in charge; the plan reads the same setting."""
    from imagic import kernels

    seen = []
    ed = Editor.from_checkpoint(ckpt, device="cpu", progress=False, kernels="torch")
    real = ed.unet.forward
    ed.unet.forward = lambda *a, **k: seen.append(kernels.resolve("auto")) or real(*a, **k)
    ed.fit(image, "a red square", **{**FAST, "embed_steps": 1, "finetune_steps": 1})
    ed.sample(ed.fit(image, "a red square", **{**FAST, "embed_steps": 1, "finetune_steps": 1}), alpha=1.0,
              steps=1, save=False)
    assert seen and set(seen) == {"torch"}
    assert ed.plan(device="cuda").settings["kernels"] == "torch"
    auto = Editor.from_checkpoint(ckpt, device="cpu", progress=False)
    auto.unet.forward = lambda *a, **k: seen.append(kernels.resolve("auto")) or real(*a, **k)
    seen.clear()
    with kernels.use_triton(False):
        auto.encode_image(auto.prepare_image(image))
        auto.txt2img("a red square", steps=1)
    assert set(seen) == {"torch"}


def test_resume_from_an_embedding_file_at_any_alignment_equals_uninterrupted(editor, image, tmp_path):
    """A stage 2 resumed in a new process reads e_opt from its file. Written with another header length (another
    width, other metadata) the file puts the tensor's data 8 bytes past a 16-byte boundary, and CPU BLAS, which
    picks kernels by alignment, rounded the LoRA projection of that context otherwise: the resumed LoRA weights
    came out 8.6e-7 away from an uninterrupted run's. They must be the same bits."""
    from safetensors.torch import load_file, save_file

    settings = {**FAST, "embed_steps": 6, "finetune_steps": 8, "save_every": 2}
    full = editor.fit(image, "a red square", out=tmp_path / "a", **settings)

    def stop(name, step, loss):
        if name.startswith("stage 2") and step == 4:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        editor.fit(image, "a red square", out=tmp_path / "b", callback=stop, **settings)
    path = tmp_path / "b" / "optimized_embedding.safetensors"
    e_opt = load_file(str(path))["embedding"].clone()
    for pad in range(64):
        save_file({"embedding": e_opt}, str(path), metadata={"pad": "x" * pad})
        if load_file(str(path))["embedding"].data_ptr() % 16 == 8:
            break
    assert load_file(str(path))["embedding"].data_ptr() % 16 == 8
    resumed = editor.fit(image, "a red square", out=tmp_path / "b", **settings)
    for k in full.finetuned:
        assert torch.equal(full.finetuned[k], resumed.finetuned[k]), k
