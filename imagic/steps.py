"""Each step of an Imagic edit, written once. The editor's loops (`imagic.fitting`, `Editor.sample_latents`), the
planner (`imagic.plan_steps`, on meta tensors) and benchmarks/imagic_step.py all call these functions.

    stage 1 step      one Adam step on the text embedding e, the model frozen              (paper eq. 2)
    stage 2 step      one Adam step on the stage-2 weights with e_opt frozen               (paper eq. 3)
    trainable         the stage-2 weights (LoRA adapters or the whole UNet) made trainable in fp32
    denoiser          the UNet in the working precision, returning fp32
    interpolate       e = alpha * e_tgt + (1 - alpha) * e_opt                               (paper eq. 4)
    guided DDIM step  classifier-free guidance and one DDIM update from that e

Both training steps minimise the denoising loss on the input image's latent x0,

    L = || target(x0, eps, t) - f(x_t, t, e) ||^2,   x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,

with t uniform and eps standard normal drawn from one seeded CPU generator, so a seed gives the same stream on any
device and a resumed loop continues the interrupted one's. The target is the noise for epsilon models and the
velocity for v models (SD 2.x 768-v): what the model was trained to predict.

A `Device` says how a step enters autocast, runs the backward pass and reads back a finiteness check: `OnDevice`
on a real device, `meta_device.AsOnDevice` in the planner (meta tensors have no values to check).
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Protocol, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import lora as L
from .config import ModelConfig
from .samplers import Model, StepOutput, ddim_step, ddim_timesteps, guided_model_output
from .schedule import NoiseSchedule
from .sdxl import VectorUNet, size_features
from .settings import PRECISIONS, FitSettings

SizeConditioning = Dict[str, List[int]]  # SDXL: original_size (h, w), crop_top_left (top, left), target_size (h, w)


class Device(Protocol):
    """How a step runs where its tensors are."""

    def autocast(self) -> ContextManager[None]: ...

    def backward(self, loss: Tensor) -> None: ...

    def all_finite(self, values: Tensor) -> bool: ...


class OnDevice:
    """A real device in a working precision: autocast to fp16/bf16 around the UNet forward (none for fp32),
    `loss.backward()`, and checks read back to the host (one sync each)."""

    def __init__(self, device: Union[str, torch.device], precision: str):
        self.device, self.precision = torch.device(device), precision

    def autocast(self) -> ContextManager[None]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=PRECISIONS[self.precision])

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def all_finite(self, values: Tensor) -> bool:
        return bool(torch.isfinite(values).all())


NO_AUTOCAST = OnDevice("cpu", "fp32")  # fp32 enters no autocast, whatever the tensors' device


class NonFinite(ArithmeticError):
    """A training step found a NaN or Inf `what` ("loss" or "gradient") and updated nothing."""

    def __init__(self, what: str, loss: Tensor):
        super().__init__(what)
        self.what, self.loss = what, loss


# --- how the UNet is called ------------------------------------------------------------------------------------

def unet_call(unet: nn.Module, config: ModelConfig, sizes: Optional[SizeConditioning],
              device: Union[str, torch.device]) -> Model:
    """The UNet as the loops and the sampler call it with one embedding tensor: the UNet itself, or for a
    vector-conditioned UNet (SDXL) a `VectorUNet` that unpacks the embedding and appends `sizes`' features
    (made on `device`) to the pooled vector to make `y`."""
    if config.unet.num_classes is None:
        return unet
    if config.text2 is None or sizes is None:
        raise ValueError("a vector-conditioned UNet needs a second, pooled text tower (text2) and size conditioning")
    features = size_features(tuple(sizes["original_size"]), tuple(sizes["crop_top_left"]),  # type: ignore[arg-type]
                             tuple(sizes["target_size"]), config.size_embed_dim, torch.device(device))
    return VectorUNet(unet, config.text2.projection_dim, features)


def denoiser(model: Model, dtype: torch.dtype) -> Model:
    """`model` fed in the working precision `dtype` (the frozen weights'), its output returned in fp32."""
    return lambda x, t, context: model(x.to(dtype), t, context.to(dtype)).float()


# --- stages 1 and 2 ----------------------------------------------------------------------------------------------

def denoising_loss(model: Model, schedule: NoiseSchedule, x0: Tensor, context: Tensor, generator: torch.Generator,
                   device: Device = NO_AUTOCAST) -> Tensor:
    """One Monte-Carlo sample of L (see the module docstring), t and eps from `generator` (a CPU generator)."""
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (b,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.training_target(x0, noise, t)
    with device.autocast():
        pred = model(x_t, t, context.expand(b, -1, -1))
    return F.mse_loss(pred.float(), target.float())


def gradients_finite(params: Sequence[Tensor], device: Device) -> bool:
    """Whether every gradient is finite, through one sum: it is NaN or Inf as soon as one element is (inf plus -inf
    gives NaN), and a finite sum that overflowed fp32 is flagged too, rightly: such a gradient has blown up. One
    reduction per tensor and one sync is ~5x cheaper than isfinite().all() on hundreds of small tensors."""
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or device.all_finite(torch.stack([g.sum() for g in grads]).sum())


def optimizer_step(params: Sequence[Tensor], optimizer: torch.optim.Optimizer, loss_fn: Callable[[], Tensor],
                   device: Device) -> Tensor:
    """zero_grad, the loss, backward, the update; returns the loss. A NaN or Inf loss or gradient raises
    NonFinite before the optimizer touches the parameters, so saved state never holds the damage."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    if not device.all_finite(loss.detach()):
        raise NonFinite("loss", loss.detach())
    device.backward(loss)
    if not gradients_finite(params, device):  # e.g. fp16 overflow in the backward: Adam would make it NaN
        raise NonFinite("gradient", loss.detach())
    optimizer.step()
    return loss.detach()


def stage1_step(model: Model, schedule: NoiseSchedule, x0: Tensor, e: Tensor, optimizer: torch.optim.Optimizer,
                generator: torch.Generator, device: Device) -> Tensor:
    """Paper eq. 2: one Adam step on the embedding `e` (the optimizer's one parameter), the model frozen."""
    return optimizer_step([e], optimizer, lambda: denoising_loss(model, schedule, x0, e, generator, device), device)


def stage2_step(model: Model, schedule: NoiseSchedule, x0: Tensor, e_opt: Tensor, params: Sequence[Tensor],
                optimizer: torch.optim.Optimizer, generator: torch.Generator, device: Device) -> Tensor:
    """Paper eq. 3: one Adam step on the stage-2 weights `params` (from `trainable`), e_opt frozen."""
    return optimizer_step(params, optimizer, lambda: denoising_loss(model, schedule, x0, e_opt, generator, device),
                          device)


def make_adam(params: List[Tensor], lr: float) -> torch.optim.Adam:
    """Adam; the fused implementation (one kernel for all tensors, ~3x faster on the CPU for a small UNet's few
    hundred tensors) when every parameter is an fp32 tensor on a device that has it."""
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


@contextlib.contextmanager
def trainable(unet: nn.Module, s: FitSettings) -> Iterator[List[Tensor]]:
    """Stage 2's parameters, trainable in fp32 inside the block: rank-r LoRA adapters (`imagic.lora`, seeded by
    s.seed) or every UNet weight (fp32 master weights, as their Adam moments); the base model comes back after."""
    if s.finetune == "lora":
        L.inject_lora(unet, rank=s.lora_rank, alpha=s.lora_alpha, seed=s.seed)
        try:
            yield L.lora_parameters(unet)
        finally:
            L.remove_lora(unet)
        return
    dtype = next(unet.parameters()).dtype
    base = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    unet.float().requires_grad_(True)
    try:
        yield list(unet.parameters())
    finally:
        unet.zero_grad(set_to_none=True)  # the last step's gradients: as large as the fp32 weights
        unet.requires_grad_(False).load_state_dict(base)
        unet.to(dtype)


# --- stage 3 ---------------------------------------------------------------------------------------------------

def interpolate(e_tgt: Tensor, e_opt: Tensor, alpha: float) -> Tensor:
    """Paper eq. 4: e = alpha * e_tgt + (1 - alpha) * e_opt. alpha = 0 is e_opt (the input image back); larger
    alphas apply more of the edit (the paper uses 0.6-0.8 on Imagen, SD ports 0.9-1.5)."""
    return alpha * e_tgt + (1 - alpha) * e_opt


@torch.no_grad()
def guided_ddim_step(model: Model, schedule: NoiseSchedule, x: Tensor, t: int, t_prev: int, context: Tensor,
                     uncond: Optional[Tensor], guidance_scale: float, ddim_eta: float, device: Device,
                     generator: Optional[torch.Generator] = None) -> StepOutput:
    """Classifier-free guidance (both halves in one doubled batch) and the DDIM update x_t -> x_{t_prev}
    (`t_prev` < 0: the last step), the model under the device's autocast."""
    with device.autocast():
        out = guided_model_output(model, x, t, context, uncond, guidance_scale)
        return ddim_step(schedule, out, x, t, t_prev, ddim_eta, generator=generator)


# callback(step_index, t, latents after the step, x0 predicted at this step)
Callback = Callable[[int, int, Tensor, Tensor], None]


def sample_ddim(model: Model, schedule: NoiseSchedule, latents: Tensor, context: Tensor, uncond: Optional[Tensor],
                steps: int, guidance_scale: float, ddim_eta: float, device: Device = NO_AUTOCAST,
                generator: Optional[torch.Generator] = None, callback: Optional[Callback] = None,
                progress: bool = True, start_step: int = 0) -> Tensor:
    """DDIM sampling with classifier-free guidance from `latents` at timestep `ddim_timesteps(steps)[start_step]`
    (pure noise for start_step 0; `samplers.sdedit_start` starts from a noised image). Returns the final latents."""
    timesteps: Sequence[int] = ddim_timesteps(steps, schedule.num_timesteps).tolist()
    x = latents
    for i in tqdm(range(start_step, steps), desc="DDIM", disable=not progress):
        t_prev = timesteps[i + 1] if i + 1 < steps else -1
        x, x0 = guided_ddim_step(model, schedule, x, timesteps[i], t_prev, context, uncond, guidance_scale,
                                 ddim_eta, device, generator)
        if callback is not None:
            callback(i, timesteps[i], x, x0)
    return x
