"""Scaled dot-product attention, FlashAttention-2 style: softmax(q k^T * scale) v without the Lq x Lk matrix.

Shapes: q (B, H, Lq, D), k and v (B, H, Lk, D); returns (B, H, Lq, D) in q's dtype.

Forward (Dao 2023, "FlashAttention-2", Alg. 1). For a block of query rows, stream over key blocks keeping
a running row maximum m, a running denominator l and an unnormalised output acc (all fp32):

    s   = q k_j^T * scale                       (scores of this key block)
    m'  = max(m, rowmax(s));  p = exp(s - m');  alpha = exp(m - m')
    l   = l * alpha + rowsum(p);  acc = acc * alpha + p v_j;  m = m'
    o   = acc / l,  lse = m + log(l)             (lse = logsumexp of the row, saved in fp32)

We work in base 2: `qk_scale = scale * log2(e)` is folded into the scores once, so every exponential is an
`exp2` (one MUFU instruction on NVIDIA GPUs) and lse is converted back to natural log when stored.

Backward (Alg. 2). With P = softmax(S), S = scale * Q K^T and upstream dO:

    dV = P^T dO          dP = dO V^T          dS = P * (dP - delta),  delta_i = rowsum(dO_i * O_i)
    dQ = scale * dS K    dK = scale * dS^T Q

P is recomputed from the saved lse (p = exp2(s*log2e - lse*log2e)), never stored. Three kernels:
`_attn_bwd_delta` (delta), `_attn_bwd_dkdv` (one program per key block, looping over query blocks) and
`_attn_bwd_dq` (one program per query block, looping over key blocks): no atomics, deterministic. With few
keys (cross-attention, Lk = 77) there are too few key blocks to fill the GPU, so the dK/dV query loop is
split into chunks whose fp32 partial sums are added on the host.

Ragged shapes: rows past Lq and keys past Lk are masked (keys get score -inf); the head dimension is padded
to BLOCK_D = next_power_of_2(D) with masked loads (d < D), so SD's 40/80/160 work (tl.dot needs power-of-two
tiles). Head dims above 256 (the VAE's single 512-dim head) fall back to torch SDPA.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .dispatch import cdiv, interpreting, multiprocessor_count, next_power_of_2, triton_enabled, triton_kernel

try:
    import triton.language as tl
except ImportError:  # the reference/SDPA path works without Triton
    tl = None

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: Optional[float] = None) -> torch.Tensor:
    """The spec: explicit softmax attention accumulated in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)


# ----------------------------------------------------------------------------------------------- kernels

@triton_kernel(key=("Lq", "Lk", "BLOCK_D"), interpret=dict(BLOCK_M=16, BLOCK_N=16))
def _attn_fwd(Q, K, V, O, LSE,
              sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
              H, Lq, Lk, D, qk_scale,
              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head); online softmax over all key blocks."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < Lq
    d_mask = offs_d < D

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scaled scores (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)                 # running softmax denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)        # running unnormalised output
    for start_n in range(0, Lk, BLOCK_N):
        n = start_n + offs_n
        n_mask = n < Lk
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))  # keys past Lk get no weight
        m_new = tl.maximum(m_i, tl.max(s, 1))           # finite: every block holds at least one real key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)                     # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    o = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_mask)


@triton_kernel(interpret=dict(BLOCK_M=16))
def _attn_bwd_delta(O, DO, DELTA, sob, soh, som, sdb, sdh, sdm, H, Lq, D,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id (fp32): the row term of the softmax VJP, shared by both gradient kernels."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton_kernel(key=("Lq", "Lk", "BLOCK_D"), interpret=dict(BLOCK_M=16, BLOCK_N=16))
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sps, spb, sph, spn,
                   H, Lq, Lk, D, rows_per_split, scale, qk_scale,
                   BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, head) and one chunk of query rows; writes fp32 partial dK, dV.

    Works on the transposed scores s^T (BLOCK_N x BLOCK_M) so that dV += p^T dO and dK += ds^T Q are plain dots.
    """
    split = tl.program_id(2)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    kv_mask = (offs_n < Lk)[:, None] & d_mask[None, :]
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    row_base = bh.to(tl.int64) * Lq

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, Lq)
    for start_m in range(lo, hi, BLOCK_M):
        m = start_m + offs_m
        m_mask = m < hi  # not `< Lq`: the last block must not spill into the next chunk's rows
        qd_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(q_base + m[:, None] * sqm + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(do_base + m[:, None] * sdm + offs_d[None, :], mask=qd_mask, other=0.0)
        # lse = +inf past the chunk makes p exactly 0 there. Rows of this tile past Lk (k = 0, so s = 0) may
        # overflow to inf when lse is very negative; each row of dk/dv depends only on its own row of p_t,
        # and those rows are never stored.
        lse2 = tl.load(LSE + row_base + m, mask=m_mask, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + m, mask=m_mask, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    part = split.to(tl.int64) * sps + b * spb + h * sph + offs_n[:, None] * spn + offs_d[None, :]
    tl.store(DK + part, dk * scale, mask=kv_mask)
    tl.store(DV + part, dv, mask=kv_mask)


@triton_kernel(key=("Lq", "Lk", "BLOCK_D"), interpret=dict(BLOCK_M=16, BLOCK_N=16))
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sgb, sgh, sgm,
                 H, Lq, Lk, D, scale, qk_scale,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head); dQ = scale * sum over key blocks of dS K."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < Lq
    d_mask = offs_d < D
    qd_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :], mask=qd_mask, other=0.0)
    row_base = bh.to(tl.int64) * Lq
    lse2 = tl.load(LSE + row_base + offs_m, mask=m_mask, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=m_mask, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        n = start_n + offs_n
        n_mask = n < Lk
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        # Padded keys must get p = 0 exactly: exp2(0 - lse2) can overflow to inf, and inf * 0 is NaN.
        p = tl.exp2(tl.where(n_mask[None, :], s, float("-inf")) - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    tl.store(DQ + b * sgb + h * sgh + offs_m[:, None] * sgm + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=qd_mask)


# ----------------------------------------------------------------------------------------- GPU configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per padded head dim; autotuned per (Lq, Lk, dtype).
# Bigger head dims need smaller tiles: the fp32 accumulators live in registers, the k/v stages in shared memory.

def _configs(table: dict, block_d: int) -> list:
    """The candidate configs for the smallest table entry that holds block_d."""
    rows = table[min(d for d in table if d >= block_d)]
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in rows]


_FWD = {64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
        128: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
        256: [(64, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)]}
_DKDV = {64: [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3)],
         128: [(32, 64, 4, 3), (64, 64, 8, 2), (32, 128, 8, 2)],
         256: [(32, 64, 8, 1), (16, 64, 4, 2), (32, 32, 4, 2)]}
_DQ = {64: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3)],
       128: [(64, 64, 4, 3), (128, 32, 8, 2), (64, 32, 4, 3)],
       256: [(64, 32, 4, 2), (32, 64, 4, 2), (64, 64, 8, 1)]}
_SPLIT_ROWS = 128  # dK/dV query chunks are multiples of this (a multiple of every BLOCK_M above)


# -------------------------------------------------------------------------------------------- launchers

def _head_block(d: int) -> int:
    return max(16, next_power_of_2(d))  # tl.dot tiles are powers of two, at least 16 wide


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs (tests) get exact fp32 dots; on a GPU the default would silently use TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels assume a unit stride along the head dim; other strides (transposed views) are free."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """o (layout of q) and lse (B, H, Lq) fp32, the natural-log logsumexp of each scaled score row."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    block_d = _head_block(D)
    _attn_fwd(lambda meta: (cdiv(Lq, meta["BLOCK_M"]), B * H),
              q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
              H, Lq, Lk, D, scale * LOG2E,
              configs=_configs(_FWD, block_d), BLOCK_D=block_d, PRECISION=_precision(q.dtype))
    return o, lse


def _lq_splits(Lq: int, Lk: int, BH: int, device: torch.device) -> int:
    """Rows per dK/dV chunk: split the query loop until there are about two waves of programs."""
    if interpreting():
        return 24  # test sizes: several chunks, ending mid-tile (16), so the chunk-end mask is exercised
    key_blocks = cdiv(Lk, 128) * BH
    splits = max(1, min(cdiv(2 * multiprocessor_count(device), key_blocks), cdiv(Lq, _SPLIT_ROWS)))
    return cdiv(cdiv(Lq, splits), _SPLIT_ROWS) * _SPLIT_ROWS


def _flash_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, scale: float, needs: Tuple[bool, bool, bool]
                    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """dq, dk, dv (None where not needed) for upstream gradient do."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    do = _unit_stride(do)
    block_d = _head_block(D)
    precision = _precision(q.dtype)
    delta = torch.empty_like(lse)
    _attn_bwd_delta(lambda meta: (cdiv(Lq, meta["BLOCK_M"]), B * H),
                    o, do, delta, *o.stride()[:3], *do.stride()[:3], H, Lq, D,
                    configs=[dict(BLOCK_M=64, num_warps=4)], BLOCK_D=block_d)
    dq = dk = dv = None
    if needs[1] or needs[2]:
        rows = _lq_splits(Lq, Lk, B * H, q.device)
        splits = cdiv(Lq, rows)
        dk_part = torch.empty((splits, B, H, Lk, D), device=q.device, dtype=torch.float32)
        dv_part = torch.empty_like(dk_part)
        _attn_bwd_dkdv(lambda meta: (cdiv(Lk, meta["BLOCK_N"]), B * H, splits),
                       q, k, v, do, dk_part, dv_part, lse, delta,
                       *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk_part.stride()[:4],
                       H, Lq, Lk, D, rows, scale, scale * LOG2E,
                       configs=_configs(_DKDV, block_d), BLOCK_D=block_d, PRECISION=precision)
        dk = dk_part.sum(0).to(k.dtype)
        dv = dv_part.sum(0).to(v.dtype)
    if needs[0]:
        dq = torch.empty_like(q)
        _attn_bwd_dq(lambda meta: (cdiv(Lq, meta["BLOCK_M"]), B * H),
                     q, k, v, do, dq, lse, delta,
                     *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
                     H, Lq, Lk, D, scale, scale * LOG2E,
                     configs=_configs(_DQ, block_d), BLOCK_D=block_d, PRECISION=precision)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, o and the fp32 logsumexp; the backward recomputes P blockwise."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
        o, lse = _flash_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: torch.Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _flash_backward(do, q, k, v, o, lse, ctx.scale, ctx.needs_input_grad[:3])
        return dq, dk, dv, None


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Shapes and dtypes the Triton path handles; anything else goes to torch SDPA."""
    return (q.dim() == 4 and k.dim() == 4 and v.shape == k.shape and q.shape[:2] == k.shape[:2]
            and q.shape[-1] == k.shape[-1] and 0 < q.shape[-1] <= MAX_HEAD_DIM
            and q.dtype == k.dtype == v.dtype and q.dtype in DTYPES
            and q.numel() > 0 and k.numel() > 0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v, scale defaulting to D**-0.5: Triton on CUDA when supported, else torch SDPA."""
    if triton_enabled(q, k, v) and supported(q, k, v):
        return _FlashAttention.apply(q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale))
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
