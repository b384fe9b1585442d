"""LayerNorm over the last dimension, statistics in fp32.

x viewed as (M rows, D features):
    mean, rstd = mean(x_row), 1 / sqrt(var(x_row) + eps)      (biased variance, fp32)
    xhat = (x - mean) * rstd;  y = xhat * weight + bias

Backward, with upstream dy and g = dy * weight:
    dx = rstd * (g - mean_row(g) - xhat * mean_row(g * xhat))
    dweight = sum_rows dy * xhat;  dbias = sum_rows dy

Forward: one program per row, the whole row in registers (two exact passes over it, no shifted sums needed).
Backward: each program walks a run of rows, writes their dx and keeps running fp32 sums for dweight / dbias,
stored once per program as partial rows that the host adds up: deterministic, no atomics or locks (the Triton
tutorial 05-layer-norm uses a lock-protected buffer instead). Input in any float dtype, output in x's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import backward_with_fallback, triton_enabled, with_fallback
from .launch import cdiv, gpu_arch, interpreting, next_power_of_2, triton_kernel

try:
    import triton.language as tl
except ImportError:  # the reference path works without Triton
    tl = None

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_FEATURES = 16384  # a whole row must fit in one program's registers


def layer_norm_reference(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         eps: float = 1e-5) -> torch.Tensor:
    """The spec: F.layer_norm in fp32, cast back to x's dtype."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], w, b, eps).to(x.dtype)


# ----------------------------------------------------------------------------------------------- kernels

@triton_kernel()
def _ln_forward(X, Y, W, B, MEAN, RSTD, D, eps, BLOCK_D: tl.constexpr):
    """One row: statistics, normalisation and affine."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / D + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * D + cols, (xc * rstd * w + b).to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton_kernel()
def _ln_backward(X, DY, DX, W, MEAN, RSTD, DW_PART, DB_PART, M, D, rows_per_program, BLOCK_D: tl.constexpr):
    """dx for `rows_per_program` consecutive rows, plus this program's partial dweight / dbias rows."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_D], tl.float32)
    for i in range(0, rows_per_program):
        row = pid.to(tl.int64) * rows_per_program + i
        mask = col_mask & (row < M)  # the last program's run may end past M
        x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row, mask=row < M, other=0.0)
        rstd = tl.load(RSTD + row, mask=row < M, other=0.0)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        g = dy * w
        dx = rstd * (g - tl.sum(g, 0) / D - xhat * (tl.sum(g * xhat, 0) / D))
        tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    tl.store(DW_PART + pid * D + cols, dw, mask=col_mask)
    tl.store(DB_PART + pid * D + cols, db, mask=col_mask)


# -------------------------------------------------------------------------------------------- launchers

def _row_config(block_d: int) -> list:
    """Memory bound: one config, more warps for wider rows (as in the Triton layer-norm tutorial)."""
    return [dict(num_warps=min(max(block_d // 256, 1), 8))]


class _LayerNorm(torch.autograd.Function):
    """Autograd wrapper: saves x (as rows), the affine parameters and the fp32 (mean, rstd) of each row."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                eps: float) -> torch.Tensor:
        D = x.shape[-1]
        rows = x.reshape(-1, D).contiguous()
        M = rows.shape[0]
        w = torch.ones(D, device=x.device, dtype=torch.float32) if weight is None else weight.contiguous()
        b = torch.zeros(D, device=x.device, dtype=torch.float32) if bias is None else bias.contiguous()
        y = torch.empty_like(rows)
        mean = torch.empty(M, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        block_d = max(16, next_power_of_2(D))
        _ln_forward((M,), rows, y, w, b, mean, rstd, D, eps, configs=_row_config(block_d), BLOCK_D=block_d)
        ctx.save_for_backward(rows, w, b, mean, rstd)
        ctx.meta = (x.shape, weight is not None, bias is not None, eps)
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        rows, w, b, mean, rstd = ctx.saved_tensors
        shape, has_weight, has_bias, eps = ctx.meta
        needs = (ctx.needs_input_grad[0], has_weight and ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2])
        dy = dy.reshape(rows.shape)
        dx, dweight, dbias = backward_with_fallback(
            "layer_norm", lambda: _backward(dy, rows, w, b, mean, rstd, needs),
            lambda x, w, b: layer_norm_reference(x, w, b, eps), (rows, w, b), needs, dy)
        return (None if dx is None else dx.view(shape)), dweight, dbias, None


def _backward(dy: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, b: torch.Tensor, mean: torch.Tensor,
              rstd: torch.Tensor, needs: tuple):
    """dx (as rows), dweight, dbias (None where not needed) from the saved statistics."""
    M, D = rows.shape
    dy = dy.contiguous()
    # Enough programs for ~4 per SM; under the interpreter a few rows each so several programs (and a
    # ragged last run) are exercised.
    per_program = 3 if interpreting() else max(1, cdiv(M, 4 * gpu_arch(rows.device).multiprocessors))
    programs = cdiv(M, per_program)
    dx = torch.empty_like(rows)
    dw_part = torch.empty((programs, D), device=rows.device, dtype=torch.float32)
    db_part = torch.empty_like(dw_part)
    block_d = max(16, next_power_of_2(D))
    _ln_backward((programs,), rows, dy, dx, w, mean, rstd, dw_part, db_part, M, D, per_program,
                 configs=_row_config(block_d), BLOCK_D=block_d)
    dweight = dw_part.sum(0).to(w.dtype) if needs[1] else None
    dbias = db_part.sum(0).to(b.dtype) if needs[2] else None
    return dx, dweight, dbias


def supported(x: torch.Tensor) -> bool:
    """Rows that fit in one program, float dtypes."""
    return x.dim() >= 1 and x.dtype in DTYPES and x.numel() > 0 and x.shape[-1] <= MAX_FEATURES


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim in fp32, output in x's dtype: Triton on CUDA when supported, else the reference."""
    params = [t for t in (weight, bias) if t is not None]

    def reference() -> torch.Tensor:
        return layer_norm_reference(x, weight, bias, eps)

    if triton_enabled("layer_norm", x, *params) and supported(x):
        return with_fallback("layer_norm", (x, *params), lambda: _LayerNorm.apply(x, weight, bias, eps), reference)
    return reference()
