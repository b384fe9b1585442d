"""Sampler maths: the DDIM update (deterministic or with `ddim_eta` noise), classifier-free guidance, SDEdit-style
starting points and reproducible initial latents. The sampling loop is `steps.sample_ddim`, over
`steps.guided_ddim_step`.

The model is any callable `model(x, t, context) -> Tensor` with `t` a LongTensor of shape (B,); its output is
the noise or the velocity, as `NoiseSchedule.prediction_type` says.

DDIM timesteps follow the original LDM sampler (ldm/modules/diffusionmodules/util.py `make_ddim_timesteps`,
"uniform"): every `T // steps`-th step, shifted by one (1, 21, ..., 981 for 50 steps), and the last step goes to
`alphas_cumprod[0]`, not to 1 (`ddim_alphas_prev = [abar[0]] + abar[ts[:-1]]`). diffusers' DDIMScheduler with
`steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading"` (the SD checkpoints' scheduler config) is
the same.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .schedule import NoiseSchedule
from .settings import SampleSettings

Model = Callable[[Tensor, Tensor, Tensor], Tensor]


class StepOutput(NamedTuple):
    prev_sample: Tensor
    pred_x0: Tensor


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> Tensor:
    """The DDIM timesteps in sampling (descending) order: `arange(num_steps) * (T // num_steps) + 1`.

    When `num_steps` divides T this is exactly LDM's `range(0, T, T // num_steps) + 1`. Otherwise LDM's range
    has one extra entry (30 steps would run 31); like diffusers' "leading" spacing we run exactly `num_steps`.
    """
    stride = num_train_timesteps // max(num_steps, 1)
    if num_steps < 1 or stride < 1 or (num_steps - 1) * stride + 1 >= num_train_timesteps:
        raise ValueError(f"cannot take {num_steps} DDIM steps from a {num_train_timesteps}-step schedule")
    return (torch.arange(num_steps) * stride + 1).flip(0)


def _randn_like(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved (as diffusers' randn_tensor)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def ddim_step(schedule: NoiseSchedule, model_output: Tensor, x: Tensor, t: int, t_prev: int,
              ddim_eta: float = SampleSettings.ddim_eta, noise: Optional[Tensor] = None,
              generator: Optional[torch.Generator] = None) -> StepOutput:
    """One DDIM update x_t -> x_{t_prev} (Song et al. 2021, eq. 12; ldm/models/diffusion/ddim.py `p_sample_ddim`).

        x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z
        sigma  = ddim_eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)   (eq. 16)

    `t_prev < 0` means the final step, which goes to abar[0] (the LDM convention). `noise` (z) is drawn from
    `generator` when not given and `ddim_eta > 0`. Computed in fp32; returns x's dtype.
    """
    abar = schedule.alphas_cumprod
    a_t = abar[t].item()
    a_prev = abar[t_prev].item() if t_prev >= 0 else abar[0].item()
    sigma = ddim_eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    x0, eps = schedule.predict_x0_and_eps(model_output.float(), x.float(), t)
    prev = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
    if ddim_eta > 0:
        z = noise if noise is not None else _randn_like(x, generator)
        prev = prev + sigma * z.float()
    return StepOutput(prev.to(x.dtype), x0.to(x.dtype))


def _batch(context: Tensor, batch: int) -> Tensor:
    """One context (e.g. Imagic's interpolated embedding) shared by every latent of the batch."""
    return context.expand(batch, *context.shape[1:]) if context.shape[0] == 1 else context


def guided_model_output(model: Model, x: Tensor, t: Union[int, Tensor], context: Tensor,
                        uncond_context: Optional[Tensor], guidance_scale: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) on the model's output, eps or v alike:
    `uncond + g * (cond - uncond)`, with both halves in one batched call; g = 1 is the plain conditional model.
    """
    batch = x.shape[0]
    t = torch.as_tensor(t, dtype=torch.long, device=x.device).reshape(-1).expand(batch)
    context = _batch(context, batch)
    if guidance_scale == 1:
        return model(x, t, context)
    if uncond_context is None:
        raise ValueError("guidance_scale != 1 needs an unconditional context (the empty prompt's embedding)")
    out_uncond, out_cond = model(torch.cat([x, x]), torch.cat([t, t]),
                                 torch.cat([_batch(uncond_context, batch), context])).chunk(2)
    guided = out_uncond.float() + guidance_scale * (out_cond.float() - out_uncond.float())
    return guided.to(out_cond.dtype)


def sdedit_start(schedule: NoiseSchedule, x0: Tensor, strength: float, steps: int,
                 noise: Tensor) -> Tuple[Tensor, int]:
    """SDEdit (Meng et al. 2022) / img2img: noise a clean latent to the DDIM timestep that leaves
    `int(steps * strength)` steps to run. Returns (noised latents, start_step) for `steps.sample_ddim(start_step=...)`;
    the remaining timesteps are `ddim_timesteps(steps)[start_step:]`. Same choice as LDM's img2img script
    (`t_enc = int(strength * ddim_steps)`) and diffusers' img2img pipeline.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], not {strength}")
    start_step = steps - int(steps * strength)
    if start_step == steps:
        return x0, start_step
    t = int(ddim_timesteps(steps, schedule.num_timesteps)[start_step])
    return schedule.add_noise(x0, noise, t), start_step


def initial_latents(shape: Sequence[int], seed: int, device: Union[str, torch.device] = "cpu",
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Starting noise from a seeded CPU generator, drawn in fp32 then moved and cast, so a seed gives the same
    latents on CPU and GPU and in every dtype (up to rounding), like diffusers' randn_tensor with a CPU generator.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
