"""UNet parity against diffusers' UNet2DConditionModel, loaded through diffusers' own LDM key converter.

Our UNet writes original-layout keys (`model.diffusion_model.*`); `convert_ldm_unet_checkpoint` (which we did
not write) maps them to diffusers names, and `create_unet_diffusers_config_from_ldm` builds diffusers' config
from the same LDM yaml we would write. Strict loading and matching outputs then pin down names, shapes, wiring
and numerics together.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import pytest
import torch
from torch import nn

from imagic.attention import BasicTransformerBlock
from imagic.config import ModelConfig, TextConfig, UNetConfig, preset, to_ldm_yaml
from imagic.unet import ResBlock, UNetModel, timestep_embedding
from tests.helpers import randomize_, rel_err, rounding_tol

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)

PREFIX = "model.diffusion_model."
TOL = 1e-4

# Small UNets with SD's structure: three levels, attention on all but the last (like SD's 4,2,1 of four levels),
# two ResBlocks per level. SD2 uses linear projections, fixed head width and here also a depth-2 transformer.
SD1_SMALL = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(1, 2), num_res_blocks=2,
                       num_heads=2, context_dim=32)
SD2_SMALL = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(1, 2), num_res_blocks=2,
                       num_heads=-1, num_head_channels=16, use_linear_in_transformer=True, transformer_depth=2,
                       context_dim=32)


def ldm_yaml(unet: UNetConfig, family: str) -> Dict:
    """The LDM yaml we would write for a model with this UNet."""
    text = TextConfig(kind="openclip" if family != "sd1" else "openai", width=unet.context_dim)
    cfg = ModelConfig(family=family, prediction_type="v" if family == "sd2-v" else "epsilon", unet=unet, text=text)
    return to_ldm_yaml(cfg)


def ldm_state_dict(model: UNetModel) -> Dict[str, torch.Tensor]:
    return {PREFIX + k: v for k, v in model.state_dict().items()}


def diffusers_twin(model: UNetModel, family: str) -> UNet2DConditionModel:
    """A diffusers UNet holding `model`'s weights, built and converted by diffusers' single-file code."""
    ckpt = ldm_state_dict(model)
    config = create_unet_diffusers_config_from_ldm(ldm_yaml(model.cfg, family), ckpt)
    converted = convert_ldm_unet_checkpoint(ckpt, config)
    ref = UNet2DConditionModel(**config)
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


@torch.no_grad()
def shrink_(model: UNetModel) -> UNetModel:
    """Scale every conv/linear by 0.1 and each transformer's proj_in by 0.003 more, so that GroupNorm and
    LayerNorm inputs have small variances. There a wrong eps (1e-5 vs 1e-6, in any of the three norm kinds)
    moves the output by 1e-3 to 0.2 of its std (measured), 10x the tolerance or more; at unit-variance
    activations it moved the output by only 1e-5 to 3e-4 and could pass unnoticed."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            for p in module.parameters():
                p.mul_(0.1 * (0.003 if name.endswith("proj_in") else 1.0))
    return model


def small_pair(cfg: UNetConfig, family: str, small_activations: bool = False
               ) -> Tuple[UNetModel, UNet2DConditionModel]:
    ours = randomize_(UNetModel(cfg)).eval()
    if small_activations:
        shrink_(ours)
    return ours, diffusers_twin(ours, family)


def inputs(cfg: UNetConfig, size: int = 8, batch: int = 2, seq: int = 7):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    t = torch.tensor([10, 981][:batch])
    ctx = torch.randn(batch, seq, cfg.context_dim, generator=g)
    return x, t, ctx


# --- numerical parity at small width -------------------------------------------------------------------------

@pytest.mark.parametrize("small_activations", [False, True], ids=["unit", "small-activations"])
@pytest.mark.parametrize("cfg,family", [(SD1_SMALL, "sd1"), (SD2_SMALL, "sd2-v")], ids=["sd1", "sd2-v"])
def test_forward_and_context_grad_match_diffusers(cfg: UNetConfig, family: str, small_activations: bool):
    ours, ref = small_pair(cfg, family, small_activations)
    x, t, ctx = inputs(cfg)
    ctx_ours = ctx.clone().requires_grad_(True)
    ctx_ref = ctx.clone().requires_grad_(True)
    out = ours(x, t, ctx_ours)
    expected = ref(x, t, encoder_hidden_states=ctx_ref).sample
    assert out.shape == expected.shape == x.shape
    assert rel_err(out, expected) <= TOL

    # The embedding-optimisation step differentiates the loss w.r.t. the text embedding: same upstream grad.
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    assert rel_err(ctx_ours.grad, ctx_ref.grad) <= TOL


def test_scalar_timestep_broadcasts():
    ours = randomize_(UNetModel(SD1_SMALL)).eval()
    x, _, ctx = inputs(SD1_SMALL)
    with torch.no_grad():
        assert torch.equal(ours(x, torch.tensor(500), ctx), ours(x, torch.tensor([500, 500]), ctx))


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 7.0]), 6)
    freqs = 10000.0 ** (-torch.arange(3) / 3)
    expected = torch.cat([torch.cos(7.0 * freqs), torch.sin(7.0 * freqs)])
    assert torch.allclose(emb[1], expected, atol=1e-6)
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))


# --- full-size key and shape manifests on the meta device ---------------------------------------------------

def _shapes(sd: Dict[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("name", ["sd1", "sd2", "sd2-v"])
def test_full_size_keys_match_diffusers(name: str):
    cfg = preset(name)
    with torch.device("meta"):
        ours = UNetModel(cfg.unet)
    ckpt = ldm_state_dict(ours)
    config = create_unet_diffusers_config_from_ldm(ldm_yaml(cfg.unet, name), ckpt)
    converted = convert_ldm_unet_checkpoint(ckpt, config)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    assert len(converted) == len(ckpt), "the converter dropped or merged some of our keys"
    assert _shapes(converted) == _shapes(ref.state_dict())


def test_sd1_parameter_count():
    with torch.device("meta"):
        ours = UNetModel(preset("sd1").unet)
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964


def test_sd1_heads_are_8_and_sd2_heads_are_64_wide():
    with torch.device("meta"):
        sd1, sd2 = UNetModel(preset("sd1").unet), UNetModel(preset("sd2").unet)
    attn1 = sd1.input_blocks[1][1].transformer_blocks[0].attn1
    assert attn1.heads == 8 and attn1.to_q.weight.shape == (320, 320)
    deep = sd2.input_blocks[7][1].transformer_blocks[0].attn2
    assert deep.heads == 1280 // 64 and deep.to_k.weight.shape == (1280, 1024)


# --- mixed precision ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_run_and_stay_close(dtype: torch.dtype):
    ours = randomize_(UNetModel(SD2_SMALL)).eval()
    x, t, ctx = inputs(SD2_SMALL)
    with torch.no_grad():
        expected = ours(x, t, ctx)
        out = ours.to(dtype)(x.to(dtype), t, ctx.to(dtype))
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    # This forward rounds 643 op outputs to `dtype` (counted with a TorchFunctionMode) and 311 conv/linear weights:
    # 0.28 in bf16, 0.035 in fp16.
    assert rel_err(out.float(), expected) < rounding_tol(dtype, 643 + 311)


def test_autocast_bf16_runs_and_stays_close():
    ours = randomize_(UNetModel(SD1_SMALL)).eval()
    x, t, ctx = inputs(SD1_SMALL)
    ctx.requires_grad_(True)
    expected = ours(x, t, ctx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x, t, ctx)
    # 420 op outputs in bf16 (TorchFunctionMode count), and the 201 conv/linear weights and at most as many inputs
    # that autocast rounds: 0.26.
    assert rel_err(out.float(), expected) < rounding_tol(torch.bfloat16, 420 + 2 * 201)
    out.float().square().mean().backward()
    assert ctx.grad is not None and ctx.grad.dtype == torch.float32 and torch.isfinite(ctx.grad).all()


# --- gradient checkpointing ---------------------------------------------------------------------------------

def _grads(model: UNetModel, ctx: torch.Tensor) -> Dict[str, torch.Tensor]:
    x, t, _ = inputs(model.cfg)
    ctx = ctx.clone().requires_grad_(True)
    model.zero_grad()
    model(x, t, ctx).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads["context"] = ctx.grad
    return grads


def test_gradient_checkpointing_gives_same_gradients():
    plain = randomize_(UNetModel(SD1_SMALL)).train()
    ckpt = UNetModel(dataclasses.replace(SD1_SMALL, use_checkpoint=True)).train()
    ckpt.load_state_dict(plain.state_dict(), strict=True)

    # Count forward calls of a layer inside a ResBlock and inside a transformer block: recomputation in the
    # backward pass calls them twice, which shows checkpointing really ran.
    calls = {"res": 0, "attn": 0}
    ckpt.input_blocks[1][0].in_layers[2].register_forward_hook(lambda *_: calls.__setitem__("res", calls["res"] + 1))
    ckpt.input_blocks[1][1].transformer_blocks[0].attn1.register_forward_hook(
        lambda *_: calls.__setitem__("attn", calls["attn"] + 1))

    _, _, ctx = inputs(SD1_SMALL)
    expected, got = _grads(plain, ctx), _grads(ckpt, ctx)
    assert calls == {"res": 2, "attn": 2}
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-5, atol=1e-7), name


def test_set_gradient_checkpointing_toggles_every_block():
    model = UNetModel(SD1_SMALL)
    model.set_gradient_checkpointing(True)
    flags = [m.use_checkpoint for m in model.modules() if isinstance(m, ResBlock)]
    flags += [m.checkpoint for m in model.modules() if isinstance(m, BasicTransformerBlock)]
    assert flags and all(flags)
    assert SD1_SMALL.use_checkpoint is False  # the model holds its own copy of the config
    model.set_gradient_checkpointing(False)
    assert not any(m.use_checkpoint for m in model.modules() if isinstance(m, ResBlock))
