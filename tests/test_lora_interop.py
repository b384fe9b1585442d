"""LoRA files across tools, through diffusers' own loaders (which need `peft`, a test extra).

- The kohya-layout file we write (`lora_format.to_kohya`, what a run directory's lora.safetensors holds) loads into a
  diffusers `StableDiffusionPipeline` with `load_lora_weights`, and its UNet then gives our merged model's output.
- kohya files written by others load into our UNet with `lora_format.from_kohya`: one converted by diffusers' own
  PEFT -> kohya writer (`convert_state_dict_to_kohya`), and one hand-built with sd-scripts' naming (1x1-conv LoRA as 4-D
  weights, mixed ranks, alpha present or absent), both checked against diffusers' loader, then used for sampling.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch

from imagic import lora as L
from imagic import lora_format as LF
from imagic.assemble import StableDiffusion
from imagic.editor import Editor
from imagic.fileio import load_safetensors, save_safetensors
from imagic.loader import load_checkpoint
from tests.helpers import rel_err
from tests.tiny import write_tiny_checkpoint

peft = pytest.importorskip("peft", reason="diffusers' LoRA loaders need peft (a test extra)")
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402

from tests.test_diffusers_format import diffusers_pipeline  # noqa: E402

TOL = 1e-4
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def setup(request, tmp_path_factory) -> Tuple[Path, StableDiffusion]:
    tmp = tmp_path_factory.mktemp(request.param)
    return write_tiny_checkpoint(tmp / "tiny.safetensors", request.param), tmp


def fresh(ckpt: Path) -> StableDiffusion:
    return load_checkpoint(ckpt)


def unet_inputs(model: StableDiffusion):
    cfg = model.config
    g = torch.Generator().manual_seed(5)
    return (torch.randn(2, 4, cfg.latent_size, cfg.latent_size, generator=g), torch.tensor([3, 700]),
            torch.randn(2, 6, cfg.unet.context_dim, generator=g))


def randomize_lora_(unet: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in L.lora_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def diffusers_out(pipe, model: StableDiffusion) -> torch.Tensor:
    x, t, ctx = unet_inputs(model)
    with torch.no_grad():
        return pipe.unet(x, t, encoder_hidden_states=ctx).sample


def our_out(model: StableDiffusion) -> torch.Tensor:
    with torch.no_grad():
        return model.unet(*unet_inputs(model))


def test_our_kohya_file_loads_into_diffusers(setup):
    ckpt, tmp = setup
    ours = fresh(ckpt)
    pipe = diffusers_pipeline(ours, tmp / "vocab")
    base = our_out(ours)
    L.inject_lora(ours.unet, rank=4, alpha=2)  # scale 0.5: a wrong alpha convention shows
    randomize_lora_(ours.unet)
    save_safetensors(tmp / "ours.safetensors", LF.to_kohya(ours.unet), {"ss_network_module": "networks.lora"})
    L.merge_lora(ours.unet)
    expected = our_out(ours)
    assert rel_err(expected, base) > 0.05  # the LoRA matters
    pipe.load_lora_weights(str(tmp), weight_name="ours.safetensors")
    assert rel_err(diffusers_out(pipe, ours), expected) < TOL


def test_a_run_directory_lora_loads_into_diffusers(setup):
    """The file `imagic edit` leaves in a run directory, end to end."""
    ckpt, tmp = setup
    editor = Editor.from_checkpoint(ckpt, device="cpu", progress=False)
    run = editor.fit(torch.rand(1, 3, 32, 32) * 2 - 1, "a photo", out=tmp / "run", embed_steps=1,
                     finetune_steps=4, finetune_lr=0.05)
    with editor.finetuned_model(run):
        expected = our_out(editor.model)
    base = our_out(editor.model)
    assert rel_err(expected, base) > 1e-3
    pipe = diffusers_pipeline(fresh(ckpt), tmp / "vocab")
    pipe.load_lora_weights(str(tmp / "run"), weight_name="lora.safetensors")
    assert rel_err(diffusers_out(pipe, editor.model), expected) < TOL


def test_lora_written_by_diffusers_loads_into_ours(setup):
    """PEFT LoRA on diffusers' UNet -> diffusers' kohya writer -> file -> our from_kohya: same UNet output."""
    ckpt, tmp = setup
    ours = fresh(ckpt)
    pipe = diffusers_pipeline(ours, tmp / "vocab")
    # convert_state_dict_to_kohya writes alpha = rank whatever lora_alpha was, so only lora_alpha = r is faithful.
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    peft_sd = {"unet." + k: v for k, v in get_peft_model_state_dict(pipe.unet).items()}
    save_safetensors(tmp / "theirs.safetensors", convert_state_dict_to_kohya(peft_sd))
    expected = diffusers_out(pipe, ours)
    kohya, _ = load_safetensors(tmp / "theirs.safetensors")
    loaded = LF.from_kohya(ours.unet, kohya)
    assert len(loaded) == len(kohya) // 3
    assert rel_err(our_out(ours), expected) < TOL


def sd_scripts_file(pipe, alphas: str) -> Dict[str, torch.Tensor]:
    """A LoRA named as kohya's sd-scripts names it (`lora_unet_` + the diffusers module path with '_'), with 4-D
    weights for 1x1 convolutions and ranks 2 and 4. alphas: "uniform" (one alpha for all, so scales 1 and 0.5),
    "none" (no alpha tensors: alpha = rank) or "mixed" (a different alpha per module, some absent)."""
    g = torch.Generator().manual_seed(7)
    sd: Dict[str, torch.Tensor] = {}
    for i, (path, m) in enumerate(pipe.unet.named_modules()):
        if ".attentions." not in path or not any(path.endswith(t) for t in TARGETS):
            continue
        rank = 2 if i % 2 else 4
        name = "lora_unet_" + path.replace(".", "_")
        conv = isinstance(m, torch.nn.Conv2d)
        n_in, n_out = (m.in_channels, m.out_channels) if conv else (m.in_features, m.out_features)
        tail = (1, 1) if conv else ()
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, n_in, *tail, generator=g) * 0.3
        sd[f"{name}.lora_up.weight"] = torch.randn(n_out, rank, *tail, generator=g) * 0.3
        if alphas == "uniform" or alphas == "mixed" and i % 3:
            sd[f"{name}.alpha"] = torch.tensor(2.0 if alphas == "uniform" else float(i % 5 + 1))
    assert any(v.ndim == 4 for v in sd.values()) == (pipe.unet.config.use_linear_projection is False)
    return sd


def merged_by_hand(pipe, sd: Dict[str, torch.Tensor]) -> None:
    """sd-scripts' rule, W += (alpha / rank) * up @ down (alpha = rank when absent), applied to diffusers' UNet."""
    modules = dict(pipe.unet.named_modules())
    with torch.no_grad():
        for key in [k for k in sd if k.endswith(".lora_down.weight")]:
            name = key[:-len(".lora_down.weight")]
            down, up = sd[key], sd[f"{name}.lora_up.weight"]
            scale = float(sd.get(f"{name}.alpha", down.shape[0])) / down.shape[0]
            w = modules[_diffusers_path(name, modules)].weight
            # In sd-scripts' order (networks/lora.py merge_to: W + multiplier * (up @ down) * scale). Another order
            # rounds the delta differently, by an ulp; this large LoRA (scores up to 34) amplifies that into output
            # differences of 5e-5 to 1.3e-4 depending on the CPU's kernels, where the two UNets otherwise agree exactly.
            w += ((up.flatten(1) @ down.flatten(1)) * scale).view_as(w)


def _diffusers_path(kohya_name: str, modules) -> str:
    flat = {p.replace(".", "_"): p for p in modules}
    return flat[kohya_name.removeprefix("lora_unet_")]


@pytest.mark.parametrize("alphas", ["uniform", "none", "mixed"])
def test_sd_scripts_style_file_loads_into_ours(setup, alphas):
    """Reference: diffusers' load_lora_weights; for per-module alphas, a hand merge into diffusers' UNet instead,
    because diffusers 0.42 drops per-module kohya alphas (its alpha_pattern keys use the old attention-processor
    names and match no module: "The following alpha_pattern keys did not match any targeted module")."""
    ckpt, tmp = setup
    ours = fresh(ckpt)
    pipe = diffusers_pipeline(ours, tmp / "vocab")
    sd = sd_scripts_file(pipe, alphas)
    save_safetensors(tmp / f"sd_scripts_{alphas}.safetensors", sd, {"ss_network_dim": "4"})
    if alphas == "mixed":
        merged_by_hand(pipe, sd)
    else:
        pipe.load_lora_weights(str(tmp), weight_name=f"sd_scripts_{alphas}.safetensors")
    base = our_out(ours)
    kohya, _ = load_safetensors(tmp / f"sd_scripts_{alphas}.safetensors")
    LF.from_kohya(ours.unet, kohya)
    if alphas == "mixed":  # compare merged with merged (a large LoRA: branch vs merge rounding reaches ~2e-4)
        L.merge_lora(ours.unet)
    assert rel_err(our_out(ours), base) > 0.05
    assert rel_err(our_out(ours), diffusers_out(pipe, ours)) < TOL


def test_foreign_lora_for_sampling(setup):
    """Merged into an editor's UNet for sampling, then removed: the base model comes back exactly."""
    ckpt, tmp = setup
    editor = Editor.from_checkpoint(ckpt, device="cpu", progress=False)
    sd = sd_scripts_file(diffusers_pipeline(editor.model, tmp / "vocab"), "mixed")
    base = editor.txt2img("a photo", steps=2)[0]
    LF.from_kohya(editor.unet, sd, editor.config.unet)
    L.merge_lora(editor.unet)
    with_lora = editor.txt2img("a photo", steps=2)[0]
    L.unmerge_lora(editor.unet)
    L.remove_lora(editor.unet)
    assert with_lora.tobytes() != base.tobytes()
    assert editor.txt2img("a photo", steps=2)[0].tobytes() == base.tobytes()
