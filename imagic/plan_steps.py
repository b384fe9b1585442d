"""The steps `imagic.plan` counts, which are the editor's own step functions (`imagic.steps`, also what
benchmarks/imagic_step.py measures) called on `meta` tensors, and the counting of one step's bytes and FLOPs.

    stage1      forward + backward to the text embedding (weights frozen) + Adam on the embedding
    stage2      LoRA (`lora.inject_lora`, kohya's targets) or every UNet weight (fp32 master weights) + Adam
    sample      classifier-free guidance (one doubled batch, no grad) + the DDIM update
    vae_encode  the input image to its latent (posterior mean), VAE in fp32
    vae_decode  one latent to an image, VAE in fp32 (the editor decodes one latent at a time)

The text embedding is the editor's (imagic.conditioning): (1, 77, context_dim), or on a model with a second,
pooled text tower (SDXL) context and pooled vector packed into one more row, (1, 78, context_dim)
(`imagic.sdxl.pack`); a vector-conditioned UNet (`num_classes` set) is called as `steps.unet_call` calls it,
with a native-size, uncropped image's size features.

Precision as in the editor: frozen UNet weights in the working precision, the embedding, LoRA matrices, full
fine-tuning weights and their Adam state in fp32, autocast for the UNet forward (`meta_device.AsOnDevice` is the
steps' `Device` here). Adam is torch's fused implementation, which `steps.make_adam` picks on CPU and CUDA for
fp32 parameters: its state (two moments and a step counter per parameter) is created at the first step, and the
update is in place. Fused Adam has no meta kernel, so `MetaAdam` makes that state as torch.optim.Adam's
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
from .assemble import meta_model
from .clip import build_text_encoder
from .config import ModelConfig
from .kernels import launch
from .meta_device import AsOnDevice
from .plan_memory import StorageTracker
from .schedule import NoiseSchedule
from .sdxl import Conditioner, VectorUNet
from .settings import PRECISIONS, FitSettings, SampleSettings
from .steps import Model, denoiser, guided_ddim_step, stage1_step, stage2_step, trainable, unet_call
from .unet import UNetModel
from .vae import AutoencoderKL, DiagonalGaussian

SAMPLE_T, SAMPLE_T_PREV = 501, 481  # one step of a 50-step DDIM schedule, which benchmarks/imagic_step.py times
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


def _unet_call(unet: nn.Module, cfg: ModelConfig, latent: int) -> Tuple[Model, List[Tensor]]:
    """(the UNet as the editor calls it with an embedding, the tensors that call holds): `steps.unet_call` with
    the size conditioning of a native-size, uncropped image."""
    size = [latent * cfg.vae.downsample_factor] * 2
    call = unet_call(unet, cfg, {"original_size": size, "crop_top_left": [0, 0], "target_size": size}, "meta")
    return call, [call.sizes] if isinstance(call, VectorUNet) else []


class MetaAdam:
    """torch.optim.Adam(fused=True) on meta tensors, where it has no kernel: `zero_grad(set_to_none=True)` as
    Adam's, and at the first step the state `_init_group` creates for fused=True (a float32 step counter on the
    parameter's device and two moments like the parameter); the in-place update allocates nothing and is left out."""

    def __init__(self, params: List[Tensor]):
        self.params, self.state = params, {}  # type: Tuple[List[Tensor], Dict[int, List[Tensor]]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        for p in self.params:
            if p.grad is not None and id(p) not in self.state:
                self.state[id(p)] = [torch.zeros((), dtype=torch.float32, device=p.device),
                                     torch.zeros_like(p, memory_format=torch.preserve_format),
                                     torch.zeros_like(p, memory_format=torch.preserve_format)]


def _training_step(unet: nn.Module, params: List[Tensor], context: Tensor, cfg: ModelConfig, latent: int,
                   stage: int) -> Step:
    """The editor's stage-1 or stage-2 step (`steps.stage1_step` / `stage2_step`) with a seeded CPU generator and
    `MetaAdam`; resident as benchmarks/imagic_step.py's `Trainer.resident`."""
    gen, opt = torch.Generator().manual_seed(0), MetaAdam(params)
    x0 = _meta(1, cfg.unet.in_channels, latent, latent)
    schedule = NoiseSchedule.from_config(cfg)
    call, held = _unet_call(unet, cfg, latent)

    def run(device: AsOnDevice) -> None:
        if stage == 1:
            stage1_step(call, schedule, x0, context, opt, gen, device)  # type: ignore[arg-type]
        else:
            stage2_step(call, schedule, x0, context, params, opt, gen, device)  # type: ignore[arg-type]

    trainable_ids = {id(p) for p in params}
    frozen = [t for t in [*unet.parameters(), *unet.buffers()] if id(t) not in trainable_ids]
    return Step(run, {"trainable": list(params), "weights": frozen, "activations": [context, x0, *held]},
                lambda: [*(p.grad for p in params), *(t for s in opt.state.values() for t in s)])


def stage1(unet: nn.Module, cfg: ModelConfig, latent: int) -> Step:
    e = embedding(cfg, requires_grad=True)  # the embedding is param and context
    return _training_step(unet, [e], e, cfg, latent, stage=1)


@contextlib.contextmanager
def stage2(unet: nn.Module, cfg: ModelConfig, latent: int, finetune: str, lora_rank: int) -> Iterator[Step]:
    """The stage-2 step on `unet`, made trainable for the block as the editor does (`steps.trainable`)."""
    with trainable(unet, FitSettings(finetune=finetune, lora_rank=lora_rank)) as params:
        yield _training_step(unet, params, embedding(cfg), cfg, latent, stage=2)


def sample(unet: nn.Module, cfg: ModelConfig, latent: int, batch: int) -> Step:
    """`steps.guided_ddim_step` as the editor samples (its `denoiser` in the weights' dtype), for `batch` latents
    (each with its own context: seeds x alphas), with the default guidance scale."""
    x = _meta(batch, cfg.unet.in_channels, latent, latent)
    context, uncond = embedding(cfg, batch), embedding(cfg)
    schedule = NoiseSchedule.from_config(cfg)
    call, held = _unet_call(unet, cfg, latent)
    model = denoiser(call, next(unet.parameters()).dtype)
    s = SampleSettings()

    def run(device: AsOnDevice) -> None:
        guided_ddim_step(model, schedule, x, SAMPLE_T, SAMPLE_T_PREV, context, uncond, s.guidance_scale, s.ddim_eta,
                         device)  # type: ignore[arg-type]

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
