"""GEGLU (Shazeer 2020) as used in SD's FeedForward: a, gate = h.chunk(2, -1); y = a * gelu(gate), exact erf GELU."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def geglu_reference(h: torch.Tensor) -> torch.Tensor:
    """The spec, in h's dtype (ldm.modules.attention.GEGLU)."""
    a, gate = h.chunk(2, dim=-1)
    return a * F.gelu(gate)


def geglu(h: torch.Tensor) -> torch.Tensor:
    """Public op: the reference until the Triton path lands."""
    return geglu_reference(h)
