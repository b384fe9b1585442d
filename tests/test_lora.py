"""LoRA: identities of the wrappers, and kohya names checked against diffusers' own kohya converter and UNet.

The kohya test is end to end: our UNet with a random LoRA must give the same output as a diffusers
UNet2DConditionModel that holds our base weights (converted by diffusers' `convert_ldm_unet_checkpoint`) with the
exported kohya LoRA merged into the modules that diffusers' `_convert_non_diffusers_lora_to_diffusers` picks for
each name. A wrong block index, a LoRA on the wrong layer or a wrong scale changes that output.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict

import pytest
import safetensors.torch
import torch
from torch import nn

from diffusers import UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

from imagic.config import ModelConfig, TextConfig, UNetConfig, to_ldm_yaml
from imagic.lora import (
    LoRAConv2d, LoRALinear, inject_lora, lora_modules, lora_parameters, merge_lora, remove_lora, unmerge_lora)
from imagic.lora_format import from_kohya, load_lora_state_dict, lora_state_dict, to_kohya, transformer_paths
from tests.helpers import randomize_, rel_err, rounding_tol

TOL = 1e-4
KOHYA_KEY = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


# --- a hand-made module tree with the UNet's attribute names -------------------------------------------------

class ToyAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.to_q(x) @ self.to_k(x).transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1)
        return self.to_out(a @ self.to_v(x))


class ToyGEGLU(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * nn.functional.gelu(gate)


class ToyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attn1 = ToyAttention(dim)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(ToyGEGLU(dim), nn.Dropout(0.0), nn.Linear(2 * dim, dim))
        self.norm1 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        return self.ff.net(x) + x


class ToyTransformer(nn.Module):
    """SD1 style (1x1 conv projections) or SD2 style (Linear projections)."""

    def __init__(self, ch: int, use_linear: bool):
        super().__init__()
        self.use_linear = use_linear
        make = (lambda i, o: nn.Linear(i, o)) if use_linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in, self.proj_out = make(ch, ch), make(ch, ch)
        self.transformer_blocks = nn.ModuleList([ToyBlock(ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = x if self.use_linear else self.proj_in(x)
        y = y.flatten(2).transpose(1, 2)
        y = self.proj_in(y) if self.use_linear else y
        y = self.transformer_blocks[0](y)
        y = self.proj_out(y) if self.use_linear else y
        y = y.transpose(1, 2).reshape(b, c, h, w)
        return (y if self.use_linear else self.proj_out(y)) + x


class Toy(nn.Module):
    def __init__(self, use_linear: bool, ch: int = 8):
        super().__init__()
        self.input_blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(3, ch, 3, padding=1)),
            nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), ToyTransformer(ch, use_linear))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.input_blocks:
            x = block(x)
        return x


def toy(use_linear: bool, dtype: torch.dtype = torch.float32) -> Toy:
    """Frozen, as inject_lora leaves it: torch picks different (last-bit) matmul paths for inputs that require
    grad, so bit-exact comparisons need the same autograd state on both sides."""
    return randomize_(Toy(use_linear)).to(dtype).eval().requires_grad_(False)


def randomize_lora_(model: nn.Module, seed: int = 1) -> None:
    """Give lora_up (zero at init) and lora_down random values so the LoRA branch is far from a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


TOY_X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("use_linear", [False, True])
def test_inject_targets_keys_and_zero_init(use_linear: bool):
    model = toy(use_linear)
    base_keys = set(model.state_dict())
    ref = model(TOY_X)
    paths = inject_lora(model, rank=2)
    st = "input_blocks.1.1"
    assert sorted(paths) == sorted([f"{st}.proj_in", f"{st}.proj_out"] + [f"{st}.transformer_blocks.0.{n}" for n in (
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")])
    kind = LoRALinear if use_linear else LoRAConv2d
    assert isinstance(model.get_submodule(f"{st}.proj_in"), kind)
    assert isinstance(model.input_blocks[1][0], nn.Conv2d) and not isinstance(model.input_blocks[1][0], LoRAConv2d)
    # Base keys keep their names; the LoRA adds exactly lora_down/lora_up per wrapped layer.
    keys = set(model.state_dict())
    assert base_keys <= keys
    assert keys - base_keys == {f"{p}.{s}" for p in paths for s in ("lora_down.weight", "lora_up.weight")}
    assert torch.equal(model(TOY_X), ref)  # lora_up starts at zero: bit-identical to the base


@pytest.mark.parametrize("use_linear", [False, True])
def test_merge_matches_branch_and_unmerge_is_exact(use_linear: bool):
    model = toy(use_linear)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(TOY_X)
    inject_lora(model, rank=3, alpha=1.5)
    randomize_lora_(model)
    unmerged = model(TOY_X)
    assert rel_err(unmerged, ref) > 0.1  # the LoRA changes the output
    merge_lora(model)
    assert all(m.merged for _, m in lora_modules(model))
    merged = model(TOY_X)
    assert rel_err(merged, unmerged) < 1e-5
    merge_lora(model)  # a second merge must not add the delta twice
    assert torch.equal(model(TOY_X), merged)
    unmerge_lora(model)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if k in base)
    assert torch.equal(model(TOY_X), unmerged)


def test_low_precision_base_keeps_fp32_lora_and_exact_unmerge():
    model = toy(use_linear=True, dtype=torch.bfloat16)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, rank=2)
    assert model.input_blocks[1][1].proj_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.requires_grad for p in lora_parameters(model))
    x = TOY_X.to(torch.bfloat16)
    base_out = model(x)
    randomize_lora_(model)
    out = model(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, base_out) > 1
    merge_lora(model)
    # bf16 rounding only, far below the LoRA's effect: the two paths round differently, 68 results unmerged and 20
    # merged (TorchFunctionMode counts) plus the 8 merged weights: 0.088.
    assert rel_err(model(x), out) < rounding_tol(torch.bfloat16, 68 + 20 + 8)
    unmerge_lora(model)  # merging rounded the bf16 weights: only a kept copy restores them
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if k in base)


def test_gradients_reach_only_lora():
    model = toy(use_linear=False)
    inject_lora(model, rank=2)
    randomize_lora_(model)
    model(TOY_X).square().mean().backward()
    lora = {id(p) for p in lora_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in lora:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_autocast_step_with_half_precision_base():
    """Frozen bf16 base, fp32 LoRA, bf16 autocast (the training setup): fp32 gradients reach the LoRA."""
    model = toy(use_linear=False, dtype=torch.bfloat16)
    inject_lora(model, rank=2)
    randomize_lora_(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(TOY_X.to(torch.bfloat16)).float().square().mean()
    loss.backward()
    grads = [p.grad for p in lora_parameters(model)]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0
               for g in grads)


def test_remove_lora_keeps_merged_or_base_weights():
    model = toy(use_linear=False)
    keys = set(model.state_dict())
    ref = model(TOY_X)
    inject_lora(model, rank=2)
    randomize_lora_(model)
    with_lora = model(TOY_X)
    merge_lora(model)
    remove_lora(model)
    assert not list(lora_modules(model)) and set(model.state_dict()) == keys
    assert type(model.input_blocks[1][1].proj_in) is nn.Conv2d
    assert type(model.get_submodule("input_blocks.1.1.transformer_blocks.0.attn1.to_q")) is nn.Linear
    assert rel_err(model(TOY_X), with_lora) < 1e-5

    plain = toy(use_linear=False)
    inject_lora(plain, rank=2)
    randomize_lora_(plain)
    remove_lora(plain)  # not merged: the LoRA is dropped
    assert torch.equal(plain(TOY_X), ref)


def test_inject_rejects_bad_targets():
    with pytest.raises(ValueError, match="no module"):
        inject_lora(toy(False), targets=("nonexistent",))
    with pytest.raises(TypeError, match="1x1"):
        inject_lora(toy(False), targets=("input_blocks.1.0",))  # a 3x3 conv
    model = toy(False)
    inject_lora(model)
    with pytest.raises(ValueError, match="already"):
        inject_lora(model)


def test_own_state_dict_round_trip():
    model = toy(use_linear=True)
    inject_lora(model, rank=3, alpha=6)
    randomize_lora_(model)
    sd = lora_state_dict(model)
    assert all(v.dtype == torch.float32 for v in sd.values())
    fresh = toy(use_linear=True)  # same base weights (same seed), no LoRA yet
    loaded = load_lora_state_dict(fresh, sd)
    assert sorted(loaded) == sorted(p for p, _ in lora_modules(model))
    assert torch.equal(fresh(TOY_X), model(TOY_X))
    with pytest.raises(ValueError, match="not plain LoRA"):
        load_lora_state_dict(fresh, {**sd, "x.hada_w1_a": torch.zeros(1)})


# --- the real UNet and diffusers ------------------------------------------------------------------------------

try:
    from imagic.unet import UNetModel
except ImportError:  # written in parallel; the toy-tree tests above do not need it
    UNetModel = None
needs_unet = pytest.mark.skipif(UNetModel is None, reason="imagic.unet is not available")

# The brief's tiny SD1 UNet (attention only at the second level) and an SD2-style one (linear projections,
# fixed head width, depth-2 transformers, attention only at the first level): together they exercise skipped
# levels on both sides, 1x1-conv and Linear projections, and transformer_blocks.1.
SD1_TINY = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_heads=2,
                      context_dim=32)
SD2_TINY = dataclasses.replace(SD1_TINY, attention_resolutions=(1,), num_heads=-1, num_head_channels=16,
                               use_linear_in_transformer=True, transformer_depth=2)
PREFIX = "model.diffusion_model."


def tiny_unet(cfg: UNetConfig) -> nn.Module:
    return randomize_(UNetModel(dataclasses.replace(cfg))).eval()


def unet_inputs(cfg: UNetConfig):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(2, cfg.in_channels, 8, 8, generator=g), torch.tensor([10, 981]),
            torch.randn(2, 5, cfg.context_dim, generator=g))


def diffusers_twin(cfg: UNetConfig, base_sd: Dict[str, torch.Tensor]) -> UNet2DConditionModel:
    """diffusers' UNet with our base weights, configured and converted by diffusers' single-file code."""
    family = "sd2" if cfg.use_linear_in_transformer else "sd1"
    yaml = to_ldm_yaml(ModelConfig(family=family, unet=cfg, text=TextConfig(width=cfg.context_dim)))
    params = yaml["model"]["params"]["unet_config"]["params"]
    for key in ("num_heads", "num_head_channels"):  # real SD2 yamls omit the -1 placeholder
        if params.get(key) == -1:
            del params[key]
    ckpt = {PREFIX + k: v for k, v in base_sd.items()}
    config = create_unet_diffusers_config_from_ldm(yaml, ckpt)
    ref = UNet2DConditionModel(**config)
    ref.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True)
    return ref.eval()


def diffusers_module_path(kohya: Dict[str, torch.Tensor], name: str) -> str:
    """The diffusers module that diffusers' own kohya loader assigns the LoRA `name` to."""
    one = {f"{name}.lora_down.weight": kohya[f"{name}.lora_down.weight"],
           f"{name}.lora_up.weight": kohya[f"{name}.lora_up.weight"]}
    converted, _ = _convert_non_diffusers_lora_to_diffusers(one)
    (key,) = [k for k in convert_unet_state_dict_to_peft(converted) if k.endswith(".lora_A.weight")]
    return key[len("unet."):-len(".lora_A.weight")]


@needs_unet
@pytest.mark.parametrize("cfg", [SD1_TINY, SD2_TINY], ids=["sd1", "sd2"])
def test_kohya_export_matches_diffusers_loader(cfg: UNetConfig):
    ours = tiny_unet(cfg)
    ref = diffusers_twin(cfg, ours.state_dict())
    paths = inject_lora(ours, rank=4, alpha=2)  # scale 0.5: a wrong alpha convention shows
    per_transformer = 2 + 8 * cfg.transformer_depth + 2 * cfg.transformer_depth
    assert len(paths) == len(transformer_paths(cfg)) * per_transformer
    randomize_lora_(ours)
    kohya = to_kohya(ours)
    assert all(KOHYA_KEY.match(k) for k in kohya), [k for k in kohya if not KOHYA_KEY.match(k)]
    assert len(kohya) == 3 * len(paths)
    ref_modules = dict(ref.named_modules())
    with torch.no_grad():
        for key in kohya:
            if not key.endswith(".lora_down.weight"):
                continue
            name = key[:-len(".lora_down.weight")]
            assert kohya[f"{name}.alpha"].ndim == 0
            module = ref_modules[diffusers_module_path(kohya, name)]
            up, down = kohya[f"{name}.lora_up.weight"], kohya[f"{name}.lora_down.weight"]
            assert down.ndim == module.weight.ndim  # 4-D for 1x1 convs, 2-D for Linear
            scale = float(kohya[f"{name}.alpha"]) / down.shape[0]
            module.weight += (scale * up.flatten(1) @ down.flatten(1)).view_as(module.weight)
    x, t, ctx = unet_inputs(cfg)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx)
    assert rel_err(got, expected) < TOL, rel_err(got, expected)


@needs_unet
@pytest.mark.parametrize("cfg", [SD1_TINY, SD2_TINY], ids=["sd1", "sd2"])
def test_unet_zero_init_round_trips_and_merge(cfg: UNetConfig):
    x, t, ctx = unet_inputs(cfg)
    ours = tiny_unet(cfg)
    with torch.no_grad():
        base_out = ours(x, t, ctx)
        inject_lora(ours, rank=2)
        assert torch.equal(ours(x, t, ctx), base_out)
        randomize_lora_(ours)
        out = ours(x, t, ctx)
        assert rel_err(out, base_out) > 0.01

        mine, kohya = tiny_unet(cfg), tiny_unet(cfg)
        load_lora_state_dict(mine, lora_state_dict(ours))
        from_kohya(kohya, safetensors.torch.load(safetensors.torch.save(to_kohya(ours))))  # as written to a file
        assert torch.equal(mine(x, t, ctx), out)
        assert torch.equal(kohya(x, t, ctx), out)

        weights = {k: v.clone() for k, v in ours.state_dict().items()}
        merge_lora(ours)
        assert rel_err(ours(x, t, ctx), out) < TOL  # measured 7e-6 (fp32 rounding through the whole UNet)
        unmerge_lora(ours)
        assert all(torch.equal(v, weights[k]) for k, v in ours.state_dict().items())


@needs_unet
def test_from_kohya_reports_foreign_names():
    ours = tiny_unet(SD1_TINY)
    inject_lora(ours, rank=2)
    kohya = to_kohya(ours)
    te = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
          "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2)}
    with pytest.warns(UserWarning, match="text-encoder"):
        assert len(from_kohya(tiny_unet(SD1_TINY), {**kohya, **te})) == len(kohya) // 3
    bogus = {"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32),
             "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2)}
    with pytest.raises(ValueError, match="down_blocks_7"):
        from_kohya(tiny_unet(SD1_TINY), {**kohya, **bogus})
