"""Shared test utilities: random weights that leave no parameter at its default init, error measures, and
image files read back the way the library writes and reads them."""
from __future__ import annotations

from typing import Dict

import torch
from PIL import Image
from torch import nn

from imagic.images import DEFAULT_MAX_PIXELS, ImageError, from_pil, open_image, square


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
    """Max abs error divided by the reference's std (the tolerance measure of the parity tests)."""
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


def load_image(path, size: int, how: str = "crop", max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """An image file as the editor takes it in: decoded (`open_image`), made square at `size` (`square`), as a
    float32 tensor (1, 3, size, size) in [-1, 1]."""
    return from_pil(square(open_image(path, max_pixels), size, how))


def read_png_metadata(path) -> Dict[str, str]:
    """The text chunks of a PNG (`json.loads` the ones `images.save_png` encoded)."""
    with Image.open(path) as im:
        if im.format != "PNG":
            raise ImageError(f"{path}: not a PNG file ({im.format})")
        return dict(im.text)
