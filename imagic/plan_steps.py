"""The steps `imagic.plan` counts, built from the editor's own pieces exactly as benchmarks/imagic_step.py builds
the steps it measures, here on `meta` tensors, and the counting of one step's bytes and FLOPs.

    stage1      forward + backward to the text embedding (weights frozen) + Adam on the embedding
    stage2      LoRA (`lora.inject_lora`, kohya's targets) or every UNet weight (fp32 master weights) + Adam
    sample      classifier-free guidance (one doubled batch, no grad) + the DDIM update
    vae_encode  the input image to its latent (posterior mean), VAE in fp32
    vae_decode  one latent to an image, VAE in fp32 (the editor decodes one latent at a time)

The text embedding is the editor's (imagic.conditioning): (1, 77, context_dim), or on a model with a second,
pooled text tower (SDXL) context and pooled vector packed into one more row, (1, 78, context_dim)
(`imagic.sdxl.pack`); a vector-conditioned UNet (`num_classes` set) is called through `imagic.sdxl.VectorUNet`,
which unpacks it and appends a native-size, uncropped image's size features to make `y`, as the editor calls it.

Precision as in the editor: frozen UNet weights in the working precision, the embedding, LoRA matrices, full
fine-tuning weights and their Adam state in fp32, autocast for the UNet forward (`meta_device.AsOnDevice`
stands in for it). Adam is torch's fused implementation, which `training.make_adam` picks on CPU and CUDA for
fp32 parameters: its state (two moments and a step counter per parameter) is created at the first step, and the
update is in place. Fused Adam has no meta kernel, so `_fused_adam_state` makes that state as torch.optim.Adam's
`_init_group` does for fused=True, and the in-place update, which allocates nothing, is left out.

FLOPs are torch.utils.flop_counter's (matmuls, convolutions and attention; elementwise ops count zero;
recomputation under gradient checkpointing counts), with the CPU flash-attention ops added to its table, and our
Triton attention on CUDA counted from its recorded launches by the same formulas. `FlopCount` applies that table
in a plain dispatch mode: FlopCounterMode itself changes what it measures under gradient checkpointing (measured
on the tiny test model: a stage-1 step's peak grows from 2.7 to 6.8 MiB inside it, tensors of the recomputation
kept alive by its module-tracking hooks or its re-decomposition of ops; not traced further), so it only counts
the real runs the plan is checked against (`flop_counter`), apart from their memory measurement.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_backward_flop_count, sdpa_flop_count, \
    shape_wrapper

from . import kernels
from . import lora as L
from .assemble import meta_model
from .clip import build_text_encoder
from .config import ModelConfig
from .kernels import launch
from .meta_device import AsOnDevice
from .plan_memory import StorageTracker
from .samplers import ddim_step, guided_model_output
from .schedule import NoiseSchedule
from .sdxl import Conditioner, VectorUNet, size_features
from .training import PRECISIONS, denoising_loss
from .unet import UNetModel
from .vae import AutoencoderKL, DiagonalGaussian

GUIDANCE = 7.5
SAMPLE_T, SAMPLE_T_PREV = 501, 481  # one step of a 50-step DDIM schedule, as benchmarks/imagic_step.py
TEXT_TOKENS = 77


# --- FLOPs ------------------------------------------------------------------------------------------------------

def _cpu_flash(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _cpu_attention() -> Dict[object, Callable[..., int]]:
    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward}


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode, plus the CPU flash-attention ops its table lacks (CPU SDPA runs those), counted
    like the CUDA ones: how tests/test_plan.py and benchmarks/plan_check.py count the real runs."""
    return FlopCounterMode(display=False, custom_mapping=_cpu_attention())


class FlopCount(TorchDispatchMode):
    """FLOPs by FlopCounterMode's table (`flop_counter`'s), with nothing else changed (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.table = {**flop_registry, **{k: shape_wrapper(v) for k, v in _cpu_attention().items()}}

    def __torch_dispatch__(self, func: object, types: object, args: tuple = (), kwargs: Optional[dict] = None
                           ) -> object:
        out = func(*args, **(kwargs or {}))  # type: ignore[operator]
        formula = self.table.get(func._overloadpacket)  # type: ignore[attr-defined]
        if formula is not None:
            self.flops += formula(*args, **(kwargs or {}), out_val=out)
        return out


class LaunchFlops:
    """Our Triton attention's FLOPs from its recorded launches, with torch's SDPA formulas: a forward per
    `_attn_fwd`; a backward per `_attn_bwd_delta`, shaped by the dK/dV or dQ launch that follows it. `drain()`
    counts the launches recorded so far and drops them (a recorded launch holds its tensors)."""

    def __init__(self, recorded: List[launch.Launch]):
        self.recorded, self.flops, self._backward_pending = recorded, 0, False

    def drain(self) -> None:
        for item in self.recorded:
            name = item.kernel.fn.__name__
            if name == "_attn_fwd":
                q, k, v = item.args[:3]
                self.flops += sdpa_flop_count(q.shape, k.shape, v.shape)
            elif name == "_attn_bwd_delta":
                self._backward_pending = True
            elif name in ("_attn_bwd_dkdv", "_attn_bwd_dq") and self._backward_pending:
                q, k, v = item.args[:3]
                self.flops += sdpa_backward_flop_count(q.shape, q.shape, k.shape, v.shape)
                self._backward_pending = False
        self.recorded.clear()


# --- one step, counted ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Step:
    """One step to count: `run(device)` runs it; `resident` are the tensors alive before it, by label;
    `trainable_state()` lists, after it ran, the gradients and optimizer state it created."""
    run: Callable[[AsOnDevice], None]
    resident: Dict[str, List[Tensor]]
    trainable_state: Callable[[], List[Tensor]] = lambda: []


@dataclasses.dataclass
class Counted:
    peak: int
    parts: Dict[str, int]  # weights / trainable / activations at the peak
    flops: int


def count(step: Step, device_type: str, precision: str, triton: bool) -> Counted:
    """Run `step` on meta tensors as if on `device_type` (autocast to `precision`; our Triton kernels' launches
    recorded for an sm_80 GPU when `triton`, else the torch paths) and count its bytes and FLOPs."""
    device = AsOnDevice(device_type, None if precision == "fp32" else PRECISIONS[precision])
    with contextlib.ExitStack() as stack:
        launches = LaunchFlops(stack.enter_context(launch.recording(launch.TARGETS[80])) if triton else [])
        tracker, flops = StorageTracker("meta", before_op=launches.drain), FlopCount()
        for label, tensors in step.resident.items():
            tracker.add_resident(tensors, label)
        stack.enter_context(kernels.use_triton(triton, strict=triton))
        for mode in (device, tracker, flops):
            stack.enter_context(mode)
        step.run(device)
        launches.drain()
    tracker.relabel(step.trainable_state(), "trainable")
    return Counted(tracker.peak, tracker.at_peak(), flops.flops + launches.flops)


# --- the models and the steps -----------------------------------------------------------------------------------

def meta_unet(cfg: ModelConfig, precision: str, gradient_checkpointing: bool) -> UNetModel:
    unet = meta_model(lambda: UNetModel(cfg.unet), "UNet").to(PRECISIONS[precision]).requires_grad_(False)
    unet.set_gradient_checkpointing(gradient_checkpointing)
    return unet


def meta_vae(cfg: ModelConfig) -> AutoencoderKL:
    return meta_model(lambda: AutoencoderKL(cfg.vae), "VAE").requires_grad_(False)  # fp32, as the editor


def meta_text(cfg: ModelConfig, precision: str) -> nn.Module:
    """The text encoder the editor holds: one tower, or both of SDXL's (`sdxl.Conditioner`) with a second one."""
    factory = (lambda: Conditioner(cfg)) if cfg.text2 is not None else (lambda: build_text_encoder(cfg.text))
    return meta_model(factory, "text encoder").to(PRECISIONS[precision])


def _meta(*shape: int, requires_grad: bool = False) -> Tensor:
    return torch.empty(shape, device="meta").requires_grad_(requires_grad)


def embedding(cfg: ModelConfig, batch: int = 1, requires_grad: bool = False) -> Tensor:
    """The text embedding, fp32: (batch, 77, context_dim), one row more with a pooled tower (`sdxl.pack`)."""
    rows = TEXT_TOKENS + (0 if cfg.text2 is None else 1)
    return _meta(batch, rows, cfg.unet.context_dim, requires_grad=requires_grad)


def unet_call(unet: nn.Module, cfg: ModelConfig, latent: int) -> Tuple[Callable[..., Tensor], List[Tensor]]:
    """(the UNet as the editor calls it with an embedding, the tensors that call holds): the UNet itself, or on a
    vector-conditioned UNet a `VectorUNet` with the size features of a native-size uncropped image (fp32, as
    `Conditioning.unet_call` makes them on the device)."""
    if cfg.unet.num_classes is None:
        return unet, []
    if cfg.text2 is None:
        raise ValueError("a vector-conditioned UNet needs the pooled vector of a second text tower (text2)")
    size = latent * cfg.vae.downsample_factor
    sizes = size_features((size, size), (0, 0), (size, size), cfg.size_embed_dim, torch.device("meta"))
    return VectorUNet(unet, cfg.text2.projection_dim, sizes), [sizes]


def _fused_adam_state(params: List[Tensor], state: Dict[int, List[Tensor]]) -> None:
    """The state torch.optim.Adam(fused=True) creates at its first step (`_init_group`): a float32 step counter
    on the parameter's device and two moments like the parameter."""
    for p in params:
        if p.grad is not None and id(p) not in state:
            state[id(p)] = [torch.zeros((), dtype=torch.float32, device=p.device),
                            torch.zeros_like(p, memory_format=torch.preserve_format),
                            torch.zeros_like(p, memory_format=torch.preserve_format)]


class _Autocast(nn.Module):
    """The UNet called inside the autocast region, where `training.denoising_loss` would enter torch.autocast."""

    def __init__(self, unet: Callable[..., Tensor], device: AsOnDevice):
        super().__init__()
        self.unet, self.device = unet, device

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        with self.device.autocast():
            return self.unet(x, t, context)


def training_step(unet: nn.Module, params: List[Tensor], context: Tensor, x0: Tensor, schedule: NoiseSchedule,
                  cfg: ModelConfig) -> Step:
    """benchmarks/imagic_step.py `Trainer.step`: zero_grad(set_to_none), the denoising loss (t and noise from a
    CPU generator), backward, Adam; resident as its `Trainer.resident`. `unet` is called as `unet_call` says."""
    gen = torch.Generator().manual_seed(0)
    state: Dict[int, List[Tensor]] = {}
    call, held = unet_call(unet, cfg, x0.shape[-1])

    def run(device: AsOnDevice) -> None:
        for p in params:
            p.grad = None
        # precision "fp32": no torch.autocast (none exists on meta); _Autocast stands in for it around the UNet
        device.backward(denoising_loss(_Autocast(call, device), schedule, x0, context, gen, "fp32"))
        _fused_adam_state(params, state)

    trainable = {id(p) for p in params}
    frozen = [t for t in [*unet.parameters(), *unet.buffers()] if id(t) not in trainable]
    return Step(run, {"trainable": list(params), "weights": frozen, "activations": [context, x0, *held]},
                lambda: [*(p.grad for p in params), *(t for s in state.values() for t in s)])


def stage1(unet: nn.Module, cfg: ModelConfig, latent: int) -> Step:
    e = embedding(cfg, requires_grad=True)  # the embedding is param and context
    return training_step(unet, [e], e, _meta(1, cfg.unet.in_channels, latent, latent),
                         NoiseSchedule.from_config(cfg), cfg)


@contextlib.contextmanager
def stage2(unet: nn.Module, cfg: ModelConfig, latent: int, finetune: str, lora_rank: int) -> Iterator[Step]:
    """The stage-2 step on `unet`, made trainable for the block (LoRA injected, or every weight in fp32)."""
    if finetune == "lora":
        L.inject_lora(unet, rank=lora_rank)
        params = L.lora_parameters(unet)
    else:
        unet.float().requires_grad_(True)
        params = list(unet.parameters())
    try:
        yield training_step(unet, params, embedding(cfg), _meta(1, cfg.unet.in_channels, latent, latent),
                            NoiseSchedule.from_config(cfg), cfg)
    finally:
        if finetune == "lora":
            L.remove_lora(unet)


def sample(unet: nn.Module, cfg: ModelConfig, latent: int, batch: int) -> Step:
    """benchmarks/imagic_step.py `sampling_step` for `batch` latents (each with its own context: seeds x alphas)."""
    dtype = next(unet.parameters()).dtype
    x = _meta(batch, cfg.unet.in_channels, latent, latent)
    context, uncond = embedding(cfg, batch), embedding(cfg)
    schedule = NoiseSchedule.from_config(cfg)
    call, held = unet_call(unet, cfg, latent)

    def denoiser(x_: Tensor, t: Tensor, c: Tensor) -> Tensor:  # the editor's `_denoiser`
        return call(x_.to(dtype), t, c.to(dtype)).float()

    def run(device: AsOnDevice) -> None:
        with torch.no_grad(), device.autocast():
            out = guided_model_output(denoiser, x, SAMPLE_T, context, uncond, GUIDANCE)
            ddim_step(schedule, out, x, SAMPLE_T, SAMPLE_T_PREV)

    return Step(run, {"weights": [*unet.parameters(), *unet.buffers()], "activations": [x, context, uncond, *held]})


def vae_encode(vae: AutoencoderKL, cfg: ModelConfig, resolution: int) -> Step:
    """`vae.encode_latents(..., sample=False)` without its autocast guard, which has no meta form (the VAE runs
    without autocast either way)."""
    image = _meta(1, cfg.vae.in_channels, resolution, resolution)

    def run(device: AsOnDevice) -> None:
        with torch.no_grad():
            DiagonalGaussian(vae.quant_conv(vae.encoder(image))).mode() * cfg.scale_factor

    return Step(run, {"weights": [*vae.parameters(), *vae.buffers()], "activations": [image]})


def vae_decode(vae: AutoencoderKL, cfg: ModelConfig, latent: int) -> Step:
    """`vae.decode_latents` of one latent, without its autocast guard (see vae_encode)."""
    z = _meta(1, cfg.vae.embed_dim, latent, latent)

    def run(device: AsOnDevice) -> None:
        with torch.no_grad():
            vae.decoder(vae.post_quant_conv(z / cfg.scale_factor))

    return Step(run, {"weights": [*vae.parameters(), *vae.buffers()], "activations": [z]})


def model_bytes(model: Optional[nn.Module]) -> int:
    return 0 if model is None else sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
