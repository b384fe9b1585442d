"""Shared test utilities: random weights that leave no parameter at its default init."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Fill every parameter (weights, biases, norm scales and shifts) with seeded random values.

    Norm scales are centred on 1 and biases on 0 but perturbed, so a swapped or ignored norm/bias shows up.
    Float buffers that are real state (not derived ones) are left alone.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
        leaf = name.rsplit(".", 1)[-1]
        is_norm = any(s in name for s in ("norm", "ln_", "layer_norm", "ln_final", "final_layer_norm"))
        if is_norm and leaf == "weight" or leaf == "logit_scale":
            p.copy_((1.0 + 4 * noise).to(p.dtype))
        elif p.ndim >= 2 and "embedding" not in name:
            fan_in = p[0].numel()
            p.copy_((torch.randn(p.shape, generator=g) / fan_in ** 0.5).to(p.dtype))
        else:
            p.copy_((noise * 4).to(p.dtype))
    return module


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error divided by the reference's std (the issues' tolerance measure)."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).abs().max() / ref.std().clamp_min(1e-12)).item()


def rounding_tol(dtype: torch.dtype, roundings: int) -> float:
    """A bound on `rel_err` for a computation that rounds `roundings` intermediate results (op outputs, weights) to
    `dtype`, against a reference of much higher precision (or against another such computation: count the
    roundings of both). Each rounding moves a value by up to u = eps / 2 relative (2^-8 bf16, 2^-11 fp16), uniformly:
    rms u / sqrt(3). Independent and not amplified on the way out, they add up to an rms of u * sqrt(roundings / 3)
    of the output's std (an upper end: normalised residual blocks damp the earlier ones); the max over a few hundred
    outputs of a Gaussian error stays below 4x its rms (P(|Z| > 4) = 6e-5 per output)."""
    return 4 * torch.finfo(dtype).eps / 2 * (roundings / 3) ** 0.5
