"""Scaled dot-product attention: softmax(q k^T * scale) v.

Shapes: q (B, H, Lq, D), k and v (B, H, Lk, D); returns (B, H, Lq, D) in q's dtype.
This file will hold the FlashAttention-2-style Triton kernels; for now it is the reference and the SDPA path.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: Optional[float] = None) -> torch.Tensor:
    """The spec: explicit softmax attention accumulated in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Public op: torch SDPA (the fallback) until the Triton path lands."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
