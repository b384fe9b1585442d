"""GroupNorm with optional fused SiLU, statistics in fp32.

y = silu?((x - mean_g) * rstd_g * weight + bias) over groups of C/G channels and all spatial positions.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def group_norm_reference(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """The spec: normalise in fp32 (as ldm's GroupNorm32 does), cast back to x's dtype."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y = F.group_norm(x.float(), num_groups, w, b, eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """Public op: the reference until the Triton path lands."""
    return group_norm_reference(x, num_groups, weight, bias, eps, silu)
