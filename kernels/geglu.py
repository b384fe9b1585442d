"""GEGLU (Shazeer 2020) as used in SD's FeedForward: a, gate = h.chunk(2, -1); y = a * gelu(gate), exact erf GELU.

h (..., 2F) -> y (..., F). With Phi the standard normal CDF and phi its density:

    gelu(x) = x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))
    y       = a * gelu(gate)
    da      = dy * gelu(gate)
    dgate   = dy * a * gelu'(gate),   gelu'(x) = Phi(x) + x * phi(x),   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)

Fused: the chunk, the GELU and the product in one pass (eager torch reads h, writes gelu(gate), reads both
again and writes y); the backward writes dh = [da, dgate] directly. Computed in fp32, stored in h's dtype.
One program per (row, block of F): no integer division to find the row, and F is at most a few thousand.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import backward_with_fallback, triton_enabled, with_fallback
from .launch import cdiv, triton_kernel

try:
    import triton.language as tl
except ImportError:  # the reference path works without Triton
    tl = None

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def geglu_reference(h: torch.Tensor) -> torch.Tensor:
    """The spec, in h's dtype (ldm.modules.attention.GEGLU)."""
    a, gate = h.chunk(2, dim=-1)
    return a * F.gelu(gate)


# ----------------------------------------------------------------------------------------------- kernels

@triton_kernel(interpret=dict(BLOCK=16))
def _geglu_forward(H, Y, F_, BLOCK: tl.constexpr):
    """y[row, j] = h[row, j] * gelu(h[row, F + j]) for one block of j."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F_
    a = tl.load(H + row * 2 * F_ + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(H + row * 2 * F_ + F_ + cols, mask=mask, other=0.0).to(tl.float32)
    gelu = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    tl.store(Y + row * F_ + cols, (a * gelu).to(Y.dtype.element_ty), mask=mask)


@triton_kernel(interpret=dict(BLOCK=16))
def _geglu_backward(H, DY, DH, F_, BLOCK: tl.constexpr):
    """dh[row] = [dy * gelu(gate), dy * a * (Phi(gate) + gate * phi(gate))] for one block of columns."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F_
    a = tl.load(H + row * 2 * F_ + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(H + row * 2 * F_ + F_ + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * F_ + cols, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    pdf = tl.exp(-0.5 * gate * gate) * 0.3989422804014327
    tl.store(DH + row * 2 * F_ + cols, (dy * gate * cdf).to(DH.dtype.element_ty), mask=mask)
    tl.store(DH + row * 2 * F_ + F_ + cols, (dy * a * (cdf + gate * pdf)).to(DH.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------------- launchers

_CONFIGS = [dict(BLOCK=1024, num_warps=4)]  # memory bound: one config


class _GEGLU(torch.autograd.Function):
    """Autograd wrapper: saves h (the backward recomputes gelu from it; nothing else is stored)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        F2 = h.shape[-1]
        rows = h.reshape(-1, F2).contiguous()
        M, F_ = rows.shape[0], F2 // 2
        y = torch.empty((M, F_), device=h.device, dtype=h.dtype)
        _geglu_forward(lambda meta: (M, cdiv(F_, meta["BLOCK"])), rows, y, F_, configs=_CONFIGS)
        ctx.save_for_backward(rows)
        ctx.shape = h.shape
        return y.view(*h.shape[:-1], F_)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        (rows,) = ctx.saved_tensors
        dy = dy.reshape(rows.shape[0], rows.shape[1] // 2)
        (dh,) = backward_with_fallback("geglu", lambda: (_backward(dy, rows),), geglu_reference, (rows,), (True,), dy)
        return dh.view(ctx.shape)


def _backward(dy: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """dh = [da, dgate] for rows of h."""
    M, F_ = rows.shape[0], rows.shape[1] // 2
    dy = dy.contiguous()
    dh = torch.empty_like(rows)
    _geglu_backward(lambda meta: (M, cdiv(F_, meta["BLOCK"])), rows, dy, dh, F_, configs=_CONFIGS)
    return dh


def supported(h: torch.Tensor) -> bool:
    """Float input whose last dim splits in two halves."""
    return h.dim() >= 1 and h.dtype in DTYPES and h.numel() > 0 and h.shape[-1] % 2 == 0


def geglu(h: torch.Tensor) -> torch.Tensor:
    """a * gelu(gate) for h = [a, gate]: Triton on CUDA when supported, else the reference."""
    if triton_enabled("geglu", h) and supported(h):
        return with_fallback("geglu", (h,), lambda: _GEGLU.apply(h), lambda: geglu_reference(h))
    return geglu_reference(h)
