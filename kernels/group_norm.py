"""GroupNorm with optional fused SiLU, statistics in fp32.

x (N, C, *spatial), G groups of C/G channels; each (n, g) group holds M = C/G * HW values.

Forward:
    mean, rstd = mean(x_g), 1 / sqrt(var(x_g) + eps)        (biased variance, fp32)
    xhat = (x - mean) * rstd;  z = xhat * weight[c] + bias[c];  y = silu(z) if silu else z

Backward, with upstream dy:
    dz = dy * silu'(z),  silu'(z) = s * (1 + z * (1 - s)), s = sigmoid(z)      (dz = dy without the SiLU)
    dbias[c] = sum_{n,hw} dz;   dweight[c] = sum_{n,hw} dz * xhat
    g = dz * weight[c];  dx = rstd * (g - mean_group(g) - xhat * mean_group(g * xhat))

The group means of g and g * xhat are weighted sums of the per-(n, c) sums that dweight and dbias need, so the
backward is: one kernel for the per-(n, c) sums, a few (N, C)-sized torch ops, one kernel for dx.

Fused: statistics, affine and SiLU (the UNet applies SiLU after nearly every GroupNorm; fusing saves one read
and one write of the activation). x is loaded in any float dtype and everything is computed in fp32, then cast
back: the behaviour of ldm's GroupNorm32 (ldm/modules/diffusionmodules/util.py).

Kernels:
    _gn_stats      one program per (n, group): loop over the group's M values in blocks (shifted sums in fp32)
    _gn_forward    one program per (n, c, block of HW): normalise, affine, SiLU
    _gn_bwd_sums   one program per (n, c): sum dz and dz * xhat over HW
    _gn_bwd_dx     one program per (n, c, block of HW)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import backward_with_fallback, triton_enabled, with_fallback
from .launch import cdiv, next_power_of_2, triton_kernel

try:
    import triton.language as tl
except ImportError:  # the reference path works without Triton
    tl = None

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def group_norm_reference(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """The spec: normalise in fp32 (as ldm's GroupNorm32 does), cast back to x's dtype."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y = F.group_norm(x.float(), num_groups, w, b, eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------- kernels

@triton_kernel(interpret=dict(BLOCK=64))
def _gn_stats(X, MEAN, RSTD, group_size, eps, BLOCK: tl.constexpr):
    """mean and rstd of one contiguous group of `group_size` values.

    Sums are taken of x - shift with shift = the group's first value: var = E[(x-s)^2] - E[x-s]^2 then does not
    cancel catastrophically when |mean| >> std (the classic shifted-data algorithm), in a single pass.
    """
    group = tl.program_id(0).to(tl.int64)
    base = X + group * group_size
    shift = tl.load(base).to(tl.float32)
    s1 = tl.zeros([BLOCK], tl.float32)
    s2 = tl.zeros([BLOCK], tl.float32)
    for start in range(0, group_size, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < group_size
        x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - shift, 0.0)
        s1 += x
        s2 += x * x
    mean_shifted = tl.sum(s1, 0) / group_size
    var = tl.maximum(tl.sum(s2, 0) / group_size - mean_shifted * mean_shifted, 0.0)
    tl.store(MEAN + group, shift + mean_shifted)
    tl.store(RSTD + group, 1.0 / tl.sqrt(var + eps))


@triton_kernel(interpret=dict(BLOCK=16))
def _gn_forward(X, Y, W, B, MEAN, RSTD, C, HW, channels_per_group,
                SILU: tl.constexpr, BLOCK: tl.constexpr):
    """y = silu?((x - mean) * rstd * w[c] + b[c]) for one block of one (n, c) plane."""
    row = tl.program_id(0)  # n * C + c
    c = row % C
    stat = (row // C) * (C // channels_per_group) + c // channels_per_group  # n * G + g
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    plane = row.to(tl.int64) * HW
    x = tl.load(X + plane + offs, mask=mask, other=0.0).to(tl.float32)
    # (x - mean) * scale + b, not x * scale + (b - mean * scale): the folded form cancels when |mean| >> std.
    z = (x - tl.load(MEAN + stat)) * (tl.load(RSTD + stat) * tl.load(W + c).to(tl.float32)) \
        + tl.load(B + c).to(tl.float32)
    if SILU:
        z = z * tl.sigmoid(z)
    tl.store(Y + plane + offs, z.to(Y.dtype.element_ty), mask=mask)


@triton_kernel(interpret=dict(BLOCK=16))
def _gn_bwd_sums(X, DY, W, B, MEAN, RSTD, DW_PART, DB_PART, C, HW, channels_per_group,
                 SILU: tl.constexpr, BLOCK: tl.constexpr):
    """Per (n, c): sum over HW of dz * xhat (-> dweight) and of dz (-> dbias), in fp32."""
    row = tl.program_id(0)
    c = row % C
    stat = (row // C) * (C // channels_per_group) + c // channels_per_group
    mean = tl.load(MEAN + stat)
    rstd = tl.load(RSTD + stat)
    w = tl.load(W + c).to(tl.float32)
    b = tl.load(B + c).to(tl.float32)
    plane = row.to(tl.int64) * HW
    sum_dz_xhat = tl.zeros([BLOCK], tl.float32)
    sum_dz = tl.zeros([BLOCK], tl.float32)
    for start in range(0, HW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < HW
        xhat = (tl.load(X + plane + offs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        dz = tl.load(DY + plane + offs, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            z = xhat * w + b
            s = tl.sigmoid(z)
            dz = dz * s * (1.0 + z * (1.0 - s))
        sum_dz_xhat += tl.where(mask, dz * xhat, 0.0)
        sum_dz += dz  # dz is 0 on masked lanes (dy loaded as 0)
    tl.store(DW_PART + row, tl.sum(sum_dz_xhat, 0))
    tl.store(DB_PART + row, tl.sum(sum_dz, 0))


@triton_kernel(interpret=dict(BLOCK=16))
def _gn_bwd_dx(X, DY, DX, W, B, MEAN, RSTD, MEAN_G, MEAN_GX, C, HW, channels_per_group,
               SILU: tl.constexpr, BLOCK: tl.constexpr):
    """dx = rstd * (dz * w - mean_group(g) - xhat * mean_group(g * xhat)) for one block of one (n, c) plane."""
    row = tl.program_id(0)
    c = row % C
    stat = (row // C) * (C // channels_per_group) + c // channels_per_group
    mean = tl.load(MEAN + stat)
    rstd = tl.load(RSTD + stat)
    w = tl.load(W + c).to(tl.float32)
    b = tl.load(B + c).to(tl.float32)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    plane = row.to(tl.int64) * HW
    xhat = (tl.load(X + plane + offs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
    dz = tl.load(DY + plane + offs, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        z = xhat * w + b
        s = tl.sigmoid(z)
        dz = dz * s * (1.0 + z * (1.0 - s))
    dx = rstd * (dz * w - tl.load(MEAN_G + stat) - xhat * tl.load(MEAN_GX + stat))
    tl.store(DX + plane + offs, dx.to(DX.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------------- launchers

def _plane_config(hw: int) -> list:
    """One config for the per-plane kernels: memory bound, so a block size covering HW (capped) is enough."""
    block = min(max(next_power_of_2(hw), 128), 2048)
    return [dict(BLOCK=block, num_warps=4 if block <= 1024 else 8)]


def _affine(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]):
    """weight and bias as tensors (ones / zeros when absent), so the kernels have no optional arguments."""
    C = x.shape[1]
    w = torch.ones(C, device=x.device, dtype=torch.float32) if weight is None else weight.contiguous()
    b = torch.zeros(C, device=x.device, dtype=torch.float32) if bias is None else bias.contiguous()
    return w, b


class _GroupNorm(torch.autograd.Function):
    """Autograd wrapper: saves x, the affine parameters and the fp32 (mean, rstd) of each (n, group)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], eps: float, silu: bool) -> torch.Tensor:
        x = x.contiguous()
        N, C = x.shape[:2]
        HW = x[0, 0].numel()
        w, b = _affine(x, weight, bias)
        mean = torch.empty(N * num_groups, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        _gn_stats((N * num_groups,), x, mean, rstd, C // num_groups * HW, eps,
                  configs=[dict(BLOCK=1024, num_warps=8)])
        y = torch.empty_like(x)
        configs = _plane_config(HW)
        _gn_forward(lambda meta: (N * C, cdiv(HW, meta["BLOCK"])), x, y, w, b, mean, rstd,
                    C, HW, C // num_groups, configs=configs, SILU=silu)
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.shape = (N, C, HW, num_groups, silu, weight is not None, bias is not None, eps)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, w, b, mean, rstd = ctx.saved_tensors
        N, C, HW, G, silu, has_weight, has_bias, eps = ctx.shape
        needs = (ctx.needs_input_grad[0], has_weight and ctx.needs_input_grad[2], has_bias and ctx.needs_input_grad[3])
        dx, dweight, dbias = backward_with_fallback(
            "group_norm", lambda: _backward(dy, x, w, b, mean, rstd, G, silu, needs),
            lambda x, w, b: group_norm_reference(x, G, w, b, eps, silu), (x, w, b), needs, dy)
        return dx, None, dweight, dbias, None, None


def _backward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, mean: torch.Tensor,
              rstd: torch.Tensor, G: int, silu: bool, needs: tuple):
    """dx, dweight, dbias (the latter two None where not needed) from the saved statistics."""
    N, C = x.shape[:2]
    HW = x[0, 0].numel()
    dy = dy.contiguous()
    dw_part = torch.empty((N, C), device=x.device, dtype=torch.float32)
    db_part = torch.empty_like(dw_part)
    configs = _plane_config(HW)
    _gn_bwd_sums((N * C,), x, dy, w, b, mean, rstd, dw_part, db_part, C, HW, C // G,
                 configs=configs, SILU=silu)
    # Group means of g = dz * w and of g * xhat, from the per-channel sums (tiny (N, C) tensors).
    wf = w.float()
    mean_g = (db_part * wf).view(N, G, -1).sum(-1).div_(C // G * HW).view(-1)
    mean_gx = (dw_part * wf).view(N, G, -1).sum(-1).div_(C // G * HW).view(-1)
    dx = torch.empty_like(x)
    _gn_bwd_dx(lambda meta: (N * C, cdiv(HW, meta["BLOCK"])), x, dy, dx, w, b, mean, rstd, mean_g, mean_gx,
               C, HW, C // G, configs=configs, SILU=silu)
    dweight = dw_part.sum(0).to(w.dtype) if needs[1] else None
    dbias = db_part.sum(0).to(b.dtype) if needs[2] else None
    return dx, dweight, dbias


def supported(x: torch.Tensor, num_groups: int) -> bool:
    """Layouts the Triton path handles: (N, C, *spatial) float input with C divisible by num_groups."""
    return x.dim() >= 2 and x.dtype in DTYPES and x.numel() > 0 and x.shape[1] % num_groups == 0


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """GroupNorm (+ SiLU) in fp32, output in x's dtype: Triton on CUDA when supported, else the reference."""
    params = [t for t in (weight, bias) if t is not None]

    def reference() -> torch.Tensor:
        return group_norm_reference(x, num_groups, weight, bias, eps, silu)

    if triton_enabled("group_norm", x, *params) and supported(x, num_groups):
        return with_fallback("group_norm", (x, *params),
                             lambda: _GroupNorm.apply(x, num_groups, weight, bias, eps, silu), reference)
    return reference()
