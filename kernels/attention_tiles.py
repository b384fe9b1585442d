"""What the attention kernels (attention.py, attention_backward.py) share: how they cut the head dimension into
power-of-two pieces, how they pick candidate tile configs, and how they treat dtypes and strides.

The head dimension in two pieces. `tl.dot` tiles must be powers of two (at least 16), and SD1.x uses head dims
40, 80 and 160: padded to 64, 128 and 256, 37.5% of every MMA would multiply zeros. Instead the head dimension is
cut into D0 + D1 = the largest power of two <= D plus the next power of two >= the rest (`head_split`):
40 = 32 + 16 (8 columns of padding, 17% of the MMA work), 80 = 64 + 16 and 160 = 128 + 32 (none), 64 = 64 + 0.
Every dot over D becomes two dots accumulating into one tile (q k^T = q0 k0^T + q1 k1^T); every D-wide output
(p v, and in the backward dK, dV, dQ) is two tiles. FlashAttention-2 pads 40 to 64 and 80 to 96. The pieces are
constexprs, so D = 64 compiles to exactly the one-piece kernel.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from .launch import Config, next_power_of_2

LOG2E = 1.4426950408889634


def head_split(d: int) -> Tuple[int, int]:
    """(D0, D1): power-of-two pieces (each >= 16, D1 may be 0) whose sum covers d with the least padding."""
    d0 = max(16, 1 << (d.bit_length() - 1))
    rest = d - d0
    return d0, (0 if rest <= 0 else max(16, next_power_of_2(rest)))


def configs_for(table: Dict[int, Sequence[Tuple[int, int, int, int]]], padded: int) -> List[Config]:
    """The candidate configs (BLOCK_M, BLOCK_N, num_warps, num_stages) of the smallest table entry that holds a
    padded head dim D0 + D1."""
    rows = table[min(d for d in table if d >= padded)]
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in rows]


def precision(dtype: torch.dtype) -> str:
    """fp32 inputs (interpreter tests) get exact fp32 dots; fp16/bf16 dots are exact products either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels assume a unit stride along the head dim; other strides (transposed views) are free."""
    return t if t.stride(-1) == 1 else t.contiguous()
