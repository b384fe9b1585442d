"""UNet speed, ours vs diffusers' UNet2DConditionModel on the same weights and inputs.

Per latent size, three measurements, each the median of `--repeats` runs after one warm-up:

    forward          no-grad forward (what a sampling step costs, without CFG's batch of 2)
    bwd to context   forward + backward to the text embedding only, weights frozen (Imagic stage 1)
    bwd to weights   forward + backward to every weight (Imagic stage 2, full fine-tuning, optimizer excluded)

Ours and diffusers run interleaved (ours, theirs, theirs, ours, ...) so both see the same machine noise, and the
ratio diffusers/ours is reported (> 1: ours is faster). Both models hold the very same weight tensors: ours is
randomised in place (a fast seeded init; tests/helpers.randomize_ is too slow at 860M parameters), converted by
diffusers' own `convert_ldm_unet_checkpoint` with the config from `create_unet_diffusers_config_from_ldm`, and
loaded into a diffusers UNet built on the meta device with `assign=True` (no second copy in memory). Each row
also says how far the two outputs (or gradients) are apart, as a sanity check that both computed the same thing.

    python benchmarks/unet_step.py                                   # SD1.5 UNet, fp32, CPU, latents 32 and 64
    python benchmarks/unet_step.py --small                           # tiny widths: a smoke run in seconds
    python benchmarks/unet_step.py --device cuda --dtype bf16 --repeats 10
    python benchmarks/unet_step.py --sizes 32 --profile              # + the top ops of each side (torch.profiler)
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from common import time_call, write_table

from imagic.config import ModelConfig, TextConfig, UNetConfig, preset, to_ldm_yaml
from imagic.unet import UNetModel

PREFIX = "model.diffusion_model."
log = logging.getLogger("unet_step")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# SD1's structure (4 levels, attention on the first 3, 8 heads, 1x1-conv projections) at tiny widths.
SMALL_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), num_heads=8, context_dim=64)

# Weight gradients compared in the sanity column: one per part of the network, so a wiring error anywhere in the
# backward shows (all of them together at full size would hold two 3.4 GB gradient sets in memory at once).
CHECKED_GRADS = ("time_embed.0.weight", "input_blocks.0.0.weight",
                 "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                 "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
                 "output_blocks.11.0.in_layers.2.weight", "out.2.weight")


def model_config(small: bool) -> ModelConfig:
    """SD1.5 (preset "sd1"), or the same structure at tiny widths."""
    if not small:
        return preset("sd1")
    return dataclasses.replace(preset("sd1"), unet=SMALL_UNET, text=TextConfig(width=SMALL_UNET.context_dim))


@torch.no_grad()
def randomize_fast_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random weights drawn in place: matrices ~ N(0, 1/fan_in), norm scales ~ N(1, 0.2), the rest (biases,
    norm shifts) ~ N(0, 0.2). Nothing stays at a default or zero init (zero-initialised output convs included)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
        elif "norm" in name and name.endswith("weight"):
            p.normal_(1.0, 0.2, generator=g)
        else:
            p.normal_(0.0, 0.2, generator=g)
    return model


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DConditionModel behind our call signature `unet(x, timesteps, context)`."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, timesteps, encoder_hidden_states=context).sample


def diffusers_twin(ours: UNetModel, cfg: ModelConfig) -> DiffusersUNet:
    """A diffusers UNet (SDPA attention, AttnProcessor2_0) whose parameters ARE ours' tensors (shared storage)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    from diffusers.models.attention_processor import AttnProcessor2_0

    ckpt = {PREFIX + k: v for k, v in ours.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(to_ldm_yaml(cfg), ckpt)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    ref.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True, assign=True)
    ref.set_attn_processor(AttnProcessor2_0())
    return DiffusersUNet(ref).eval().requires_grad_(False)


def build_pair(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0
               ) -> Tuple[UNetModel, DiffusersUNet]:
    """Our UNet with random weights (in `dtype`, frozen) and its diffusers twin sharing those weights."""
    with torch.device("meta"):
        ours = UNetModel(cfg.unet)
    ours.to_empty(device=device)
    randomize_fast_(ours, seed)
    ours = ours.to(dtype).eval().requires_grad_(False)
    return ours, diffusers_twin(ours, cfg)


def twin_parameters(ours: nn.Module, theirs: nn.Module) -> Dict[str, nn.Parameter]:
    """Our parameter name -> the diffusers Parameter holding the same storage."""
    by_ptr = {p.data_ptr(): p for p in theirs.parameters()}
    return {name: by_ptr[p.data_ptr()] for name, p in ours.named_parameters()}


def abba(fns: Dict[str, Callable[[], object]], repeats: int, sync: Optional[Callable[[], None]],
         after: Callable[[], None] = lambda: None) -> Dict[str, List[float]]:
    """Seconds of each of `repeats` runs of each fn, interleaved in ABBA order so all see the same machine noise;
    `after` runs untimed after every call."""
    times: Dict[str, List[float]] = {n: [] for n in fns}
    for r in range(repeats):
        for n in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            times[n].append(time_call(fns[n], repeats=1, warmup=0, sync=sync))
            after()
    return times


def median(times: Sequence[float]) -> float:
    return sorted(times)[len(times) // 2]


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int, sync: Optional[Callable[[], None]],
                after: Callable[[], None] = lambda: None) -> Tuple[Dict[str, List[float]], Dict[str, object]]:
    """One warm-up call of each fn, then `abba`; also returns what each warm-up call returned."""
    warm: Dict[str, object] = {}
    for n, fn in fns.items():
        warm[n] = fn()
        after()
    return abba(fns, repeats, sync, after), warm


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error divided by the reference's std (the tolerance measure of the tests)."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).abs().max() / ref.std().clamp_min(1e-12)).item()


@dataclasses.dataclass
class Inputs:
    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    upstream: torch.Tensor  # the gradient of the loss w.r.t. the output, the same for both models


def make_inputs(size: int, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, batch: int = 1) -> Inputs:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.unet.in_channels, size, size, generator=g)
    ctx = torch.randn(batch, cfg.text.context_length, cfg.unet.context_dim, generator=g)
    up = torch.randn(x.shape, generator=g)
    return Inputs(x.to(device, dtype), torch.full((batch,), 500, device=device), ctx.to(device, dtype),
                  up.to(device, dtype))


def forward(model: nn.Module, inp: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(inp.x, inp.t, inp.context)


def backward_to_context(model: nn.Module, inp: Inputs) -> torch.Tensor:
    ctx = inp.context.detach().requires_grad_(True)
    (model(inp.x, inp.t, ctx) * inp.upstream).sum().backward()
    return ctx.grad


def backward_to_weights(model: nn.Module, inp: Inputs, checked: Dict[str, nn.Parameter]) -> List[torch.Tensor]:
    """Gradients to every weight; returns copies of the `checked` ones (the rest are freed by the caller)."""
    (model(inp.x, inp.t, inp.context) * inp.upstream).sum().backward()
    return [p.grad.clone() for p in checked.values()]


def backward_to_all_weights(model: nn.Module, inp: Inputs) -> None:
    """backward_to_weights with the weights made trainable for the call and their gradients freed after it."""
    model.requires_grad_(True)
    backward_to_weights(model, inp, {})
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)


def measure(ours: UNetModel, theirs: DiffusersUNet, inp: Inputs, repeats: int, sync: Optional[Callable[[], None]]
            ) -> Dict[str, Tuple[Dict[str, List[float]], float]]:
    """{measurement: ({"ours": [s, ...], "diffusers": [s, ...]}, max rel err of the warm-up results)}, ours and
    diffusers interleaved.

    The error is max |ours - diffusers| / std(diffusers) of the output, of the context gradient, and of the
    CHECKED_GRADS weight gradients (the worst of them)."""
    pair = {"ours": ours, "diffusers": theirs}
    own = dict(ours.named_parameters())
    twins = twin_parameters(ours, theirs)
    checked = {"ours": {n: own[n] for n in CHECKED_GRADS}, "diffusers": {n: twins[n] for n in CHECKED_GRADS}}

    def free_grads() -> None:
        for m in pair.values():
            m.zero_grad(set_to_none=True)

    out = {}
    for what, fn in (("forward", forward), ("bwd to context", backward_to_context)):
        log.info("%dx%d %s", inp.x.shape[-1], inp.x.shape[-1], what)
        times, warm = interleaved({n: functools.partial(fn, m, inp) for n, m in pair.items()}, repeats, sync)
        out[what] = (times, rel_err(warm["ours"], warm["diffusers"]))
    log.info("%dx%d bwd to weights", inp.x.shape[-1], inp.x.shape[-1])
    for m in pair.values():
        m.requires_grad_(True)
    times, warm = interleaved({n: functools.partial(backward_to_weights, m, inp, checked[n])
                               for n, m in pair.items()}, repeats, sync, after=free_grads)
    out["bwd to weights"] = (times, max(rel_err(a, b) for a, b in zip(warm["ours"], warm["diffusers"])))
    for m in pair.values():
        m.requires_grad_(False)
    return out


def profile_table(model: nn.Module, inp: Inputs, fn: Callable[[nn.Module, Inputs], object], rows: int = 15) -> str:
    """The ops taking most self time in one call of fn(model, inp) (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    fn(model, inp)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if inp.x.is_cuda else [])
    with profile(activities=activities) as prof:
        fn(model, inp)
    key = "self_device_time_total" if inp.x.is_cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def result_name(bench: str, device: torch.device, dtype: str, small: bool = False, extra: str = "") -> str:
    """benchmarks/results/<name>.md: e.g. unet_step_cpu, imagic_step_cuda_bf16, unet_step_cpu_small."""
    parts = [bench, device.type] + ([dtype] if dtype != "fp32" else []) + (["small"] if small else [])
    return "_".join(parts + ([extra] if extra else []))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sizes (64 = 512x512 pixels)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--small", action="store_true", help="tiny widths, SD1 structure: a quick smoke run")
    p.add_argument("--profile", action="store_true", help="print each side's top ops for every measurement")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p.parse_args(argv)


def notes(args: argparse.Namespace) -> List[str]:
    out = [f"Seconds are the median of {args.repeats} runs after one warm-up, ours and diffusers interleaved "
           "(ABBA order). diffusers/ours > 1 means ours is faster (ratio of the medians); best-of ratio: the same "
           "with each side's fastest run, the steadier number when other jobs load the machine in bursts.",
           "Same weights (shared tensors, converted by diffusers' convert_ldm_unet_checkpoint) and inputs "
           "(t = 500, a random 77-token context). diffusers uses AttnProcessor2_0 (torch SDPA); ours goes "
           "through imagic.kernels (Triton on CUDA when available, torch SDPA / torch norms otherwise).",
           "forward: no grad. bwd to context: weights frozen, gradient to the context only (Imagic stage 1). "
           "bwd to weights: gradient to every weight (stage 2 full fine-tuning), optimizer not included.",
           "max rel err (from the warm-up calls): max |ours - diffusers| / std(diffusers) of the output, of the "
           "context gradient, and (bwd to weights) the worst of these weight gradients: "
           f"{', '.join(CHECKED_GRADS)}."]
    if args.dtype != "fp32":
        out.append(f"In {args.dtype} the errors are rounding, not bugs: ours computes GroupNorm/LayerNorm statistics "
                   "in fp32 (ldm's GroupNorm32), diffusers in the weights' dtype; the fp32 run is the parity check.")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    cfg = model_config(args.small)
    ours, theirs = build_pair(cfg, device, dtype)
    n_params = sum(p.numel() for p in ours.parameters())

    rows = []
    for size in args.sizes:
        inp = make_inputs(size, cfg, device, dtype)
        for what, (t, err) in measure(ours, theirs, inp, args.repeats, sync).items():
            ours_s, theirs_s = median(t["ours"]), median(t["diffusers"])
            rows.append([f"{size}x{size}", what, f"{ours_s:.3f}", f"{theirs_s:.3f}", f"{theirs_s / ours_s:.2f}",
                         f"{min(t['diffusers']) / min(t['ours']):.2f}", f"{err:.1e}"])
        if args.profile:
            for what, fn in (("forward", forward), ("bwd to context", backward_to_context),
                             ("bwd to weights", backward_to_all_weights)):
                for name, m in (("ours", ours), ("diffusers", theirs)):
                    print(f"\n## {name}, {what}, {size}x{size}\n{profile_table(m, inp, fn)}")

    write_table(
        result_name("unet_step", device, args.dtype, small=args.small),
        f"UNet step: ours vs diffusers UNet2DConditionModel ({'tiny SD1-structured' if args.small else 'SD1.5'} "
        f"UNet, {n_params / 1e6:.1f}M parameters, {args.dtype}, batch 1, {device.type})",
        ["latents", "measurement", "ours s", "diffusers s", "diffusers/ours", "best-of ratio", "max rel err"], rows,
        notes=notes(args))


if __name__ == "__main__":
    main()
