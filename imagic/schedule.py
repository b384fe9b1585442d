"""The forward (noising) process of a latent diffusion model and how its UNet output is parameterised.

Stable Diffusion uses the LDM "linear" schedule (ldm/modules/diffusionmodules/util.py `make_beta_schedule`):
`betas = linspace(sqrt(linear_start), sqrt(linear_end), T, float64) ** 2`, and trains with

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,          abar_t = prod_{s<=t} (1 - beta_s)

The UNet predicts either the noise `eps` (SD 1.x, SD 2.x base) or the velocity
`v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0` (SD 2.x 768-v; Salimans & Ho 2022, ldm/models/diffusion/ddpm.py
`get_v`). Whatever it predicts is also the loss target: Imagic's optimisation and fine-tuning losses must use
`training_target`, not the raw noise, or a v-model is trained towards the wrong quantity.

The schedule is kept in float64 (as the original's numpy buffers); the per-sample arithmetic runs in fp32 on
the data's device, whatever dtype the data has, and returns that dtype.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from .config import ModelConfig, PredictionType

Timesteps = Union[int, Tensor]


class NoiseSchedule:
    """alphas_cumprod of a discrete DDPM schedule plus the model's prediction type ("epsilon" or "v")."""

    def __init__(self, betas: Tensor, prediction_type: PredictionType = "epsilon") -> None:
        if prediction_type not in ("epsilon", "v"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v', not {prediction_type!r}")
        self.prediction_type: PredictionType = prediction_type
        self.betas = betas.detach().to("cpu", torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        # sqrt(abar) and sqrt(1 - abar), taken in float64, cached in fp32 per device (MPS has no float64).
        self._sqrt_tables: Dict[torch.device, Tuple[Tensor, Tensor]] = {}

    @classmethod
    def linear(cls, timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012,
               prediction_type: PredictionType = "epsilon") -> "NoiseSchedule":
        """The LDM "linear" schedule (make_beta_schedule): linear in sqrt(beta), computed in float64."""
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        return cls(betas, prediction_type)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "NoiseSchedule":
        return cls.linear(cfg.timesteps, cfg.linear_start, cfg.linear_end, cfg.prediction_type)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def sqrt_alphas(self, t: Timesteps, like: Tensor) -> Tuple[Tensor, Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) in fp32 on `like`'s device, shaped to broadcast over `like`."""
        device = like.device
        if device not in self._sqrt_tables:
            self._sqrt_tables[device] = (self.alphas_cumprod.sqrt().float().to(device),
                                         (1.0 - self.alphas_cumprod).sqrt().float().to(device))
        t = torch.as_tensor(t, dtype=torch.long, device=device).reshape(-1)
        shape = (-1,) + (1,) * (like.ndim - 1)
        a, s = self._sqrt_tables[device]
        return a[t].view(shape), s[t].view(shape)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Timesteps) -> Tensor:
        """q_sample: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        a, s = self.sqrt_alphas(t, x0)
        return (a * x0.float() + s * noise.float()).to(x0.dtype)

    def velocity(self, x0: Tensor, noise: Tensor, t: Timesteps) -> Tensor:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (ldm/models/diffusion/ddpm.py `get_v`)."""
        a, s = self.sqrt_alphas(t, x0)
        return (a * noise.float() - s * x0.float()).to(x0.dtype)

    def training_target(self, x0: Tensor, noise: Tensor, t: Timesteps) -> Tensor:
        """What the UNet is trained to output for x_t = add_noise(x0, noise, t): the noise or the velocity."""
        return noise if self.prediction_type == "epsilon" else self.velocity(x0, noise, t)

    def predict_x0_and_eps(self, model_output: Tensor, x_t: Tensor, t: Timesteps) -> Tuple[Tensor, Tensor]:
        """Convert the model's output at x_t into (x0, eps) estimates (ddpm.py `predict_start_from_noise`,
        `predict_start_from_z_and_v`, `predict_eps_from_z_and_v`)."""
        a, s = self.sqrt_alphas(t, x_t)
        out, x = model_output.float(), x_t.float()
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x - s * eps) / a
        else:
            x0 = a * x - s * out
            eps = a * out + s * x
        return x0.to(x_t.dtype), eps.to(x_t.dtype)

    def sample_timesteps(self, batch: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Training timesteps, uniform in [0, T), on the generator's device (CPU without one)."""
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)
