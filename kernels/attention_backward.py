"""The backward pass of kernels/attention.py (FlashAttention-2, Alg. 2), head dimension in two pieces as there.

With P = softmax(S), S = scale * Q K^T and upstream dO:

    dV = P^T dO          dP = dO V^T          dS = P * (dP - delta),  delta_i = rowsum(dO_i * O_i)
    dQ = scale * dS K    dK = scale * dS^T Q

P is recomputed from the saved lse (p = exp2(s*log2e - lse*log2e)), never stored. Three kernels:
`_attn_bwd_delta` (delta), `_attn_bwd_dkdv` (one program per key block, looping over query blocks) and
`_attn_bwd_dq` (one program per query block, looping over key blocks): no atomics, deterministic. With few
keys (cross-attention, Lk = 77) there are too few key blocks to fill the GPU, so the dK/dV query loop is
split into chunks whose fp32 partial sums are added on the host.

Each dot over the head dimension is two dots (pieces D0 and D1, see attention_tiles.py); each D-wide
accumulator (dK, dV, dQ) is two fp32 tiles. The pieces are constexprs: with D1 = 0 the second half compiles away.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .attention_tiles import LOG2E, configs_for, head_split, precision, unit_stride
from .launch import cdiv, gpu_arch, interpreting, is_recording, triton_kernel

try:
    import triton.language as tl
except ImportError:  # the reference/SDPA path works without Triton
    tl = None


@triton_kernel(interpret=dict(BLOCK_M=16))
def _attn_bwd_delta(O, DO, DELTA, sob, soh, som, sdb, sdh, sdm, H, Lq,
                    D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id (fp32): the row term of the softmax VJP, shared by both gradient kernels."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Lq
    o_rows = O + b * sob + h * soh + offs_m[:, None] * som
    do_rows = DO + b * sdb + h * sdh + offs_m[:, None] * sdm
    d0 = tl.arange(0, D0)
    mask0 = m_mask[:, None] & (d0 < D)[None, :]
    o = tl.load(o_rows + d0[None, :], mask=mask0, other=0.0).to(tl.float32)
    do = tl.load(do_rows + d0[None, :], mask=mask0, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        mask1 = m_mask[:, None] & (d1 < D)[None, :]
        o = tl.load(o_rows + d1[None, :], mask=mask1, other=0.0).to(tl.float32)
        do = tl.load(do_rows + d1[None, :], mask=mask1, other=0.0).to(tl.float32)
        delta += tl.sum(o * do, 1)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, delta, mask=m_mask)


@triton_kernel(key=("Lq", "Lk", "D"), interpret=dict(BLOCK_M=16, BLOCK_N=16))
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sps, spb, sph, spn,
                   H, Lq, Lk, rows_per_split, scale, qk_scale,
                   D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, head) and one chunk of query rows; writes fp32 partial dK, dV.

    Works on the transposed scores s^T (BLOCK_N x BLOCK_M) so that dV += p^T dO and dK += ds^T Q are plain dots.
    """
    split = tl.program_id(2)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < Lk
    d0 = tl.arange(0, D0)
    k_rows = K + b * skb + h * skh + offs_n[:, None] * skn
    v_rows = V + b * svb + h * svh + offs_n[:, None] * svn
    k0 = tl.load(k_rows + d0[None, :], mask=n_mask[:, None] & (d0 < D)[None, :], other=0.0)
    v0 = tl.load(v_rows + d0[None, :], mask=n_mask[:, None] & (d0 < D)[None, :], other=0.0)
    dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        k1 = tl.load(k_rows + d1[None, :], mask=n_mask[:, None] & (d1 < D)[None, :], other=0.0)
        v1 = tl.load(v_rows + d1[None, :], mask=n_mask[:, None] & (d1 < D)[None, :], other=0.0)
        dk1 = tl.zeros([BLOCK_N, D1], tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1], tl.float32)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    row_base = bh.to(tl.int64) * Lq

    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, Lq)
    for start_m in range(lo, hi, BLOCK_M):
        m = start_m + offs_m
        m_mask = m < hi  # not `< Lq`: the last block must not spill into the next chunk's rows
        q_rows = q_base + m[:, None] * sqm
        do_rows = do_base + m[:, None] * sdm
        q0 = tl.load(q_rows + d0[None, :], mask=m_mask[:, None] & (d0 < D)[None, :], other=0.0)
        do0 = tl.load(do_rows + d0[None, :], mask=m_mask[:, None] & (d0 < D)[None, :], other=0.0)
        s_t = tl.dot(k0, tl.trans(q0), input_precision=PRECISION)
        dp_t = tl.dot(v0, tl.trans(do0), input_precision=PRECISION)
        if D1 > 0:
            q1 = tl.load(q_rows + d1[None, :], mask=m_mask[:, None] & (d1 < D)[None, :], other=0.0)
            do1 = tl.load(do_rows + d1[None, :], mask=m_mask[:, None] & (d1 < D)[None, :], other=0.0)
            s_t = tl.dot(k1, tl.trans(q1), s_t, input_precision=PRECISION)
            dp_t = tl.dot(v1, tl.trans(do1), dp_t, input_precision=PRECISION)
        # lse = +inf past the chunk makes p exactly 0 there. Rows of this tile past Lk (k = 0, so s = 0) may
        # overflow to inf when lse is very negative; each row of dk/dv depends only on its own row of p_t,
        # and those rows are never stored.
        lse2 = tl.load(LSE + row_base + m, mask=m_mask, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + m, mask=m_mask, other=0.0)
        p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
        ds_t = (p_t * (dp_t - delta[None, :])).to(q0.dtype)
        p_t = p_t.to(do0.dtype)
        dv0 = tl.dot(p_t, do0, dv0, input_precision=PRECISION)
        dk0 = tl.dot(ds_t, q0, dk0, input_precision=PRECISION)
        if D1 > 0:
            dv1 = tl.dot(p_t, do1, dv1, input_precision=PRECISION)
            dk1 = tl.dot(ds_t, q1, dk1, input_precision=PRECISION)

    part = DK + split.to(tl.int64) * sps + b * spb + h * sph + offs_n[:, None] * spn
    part_v = DV + split.to(tl.int64) * sps + b * spb + h * sph + offs_n[:, None] * spn
    tl.store(part + d0[None, :], dk0 * scale, mask=n_mask[:, None] & (d0 < D)[None, :])
    tl.store(part_v + d0[None, :], dv0, mask=n_mask[:, None] & (d0 < D)[None, :])
    if D1 > 0:
        tl.store(part + d1[None, :], dk1 * scale, mask=n_mask[:, None] & (d1 < D)[None, :])
        tl.store(part_v + d1[None, :], dv1, mask=n_mask[:, None] & (d1 < D)[None, :])


@triton_kernel(key=("Lq", "Lk", "D"), interpret=dict(BLOCK_M=16, BLOCK_N=16))
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sgb, sgh, sgm,
                 H, Lq, Lk, scale, qk_scale,
                 D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head); dQ = scale * sum over key blocks of dS K."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < Lq
    d0 = tl.arange(0, D0)
    q_rows = Q + b * sqb + h * sqh + offs_m[:, None] * sqm
    do_rows = DO + b * sdb + h * sdh + offs_m[:, None] * sdm
    q0 = tl.load(q_rows + d0[None, :], mask=m_mask[:, None] & (d0 < D)[None, :], other=0.0)
    do0 = tl.load(do_rows + d0[None, :], mask=m_mask[:, None] & (d0 < D)[None, :], other=0.0)
    dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        q1 = tl.load(q_rows + d1[None, :], mask=m_mask[:, None] & (d1 < D)[None, :], other=0.0)
        do1 = tl.load(do_rows + d1[None, :], mask=m_mask[:, None] & (d1 < D)[None, :], other=0.0)
        dq1 = tl.zeros([BLOCK_M, D1], tl.float32)
    row_base = bh.to(tl.int64) * Lq
    lse2 = tl.load(LSE + row_base + offs_m, mask=m_mask, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=m_mask, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    for start_n in range(0, Lk, BLOCK_N):
        n = start_n + offs_n
        n_mask = n < Lk
        k_rows = k_base + n[:, None] * skn
        v_rows = v_base + n[:, None] * svn
        k0 = tl.load(k_rows + d0[None, :], mask=n_mask[:, None] & (d0 < D)[None, :], other=0.0)
        v0 = tl.load(v_rows + d0[None, :], mask=n_mask[:, None] & (d0 < D)[None, :], other=0.0)
        s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
        dp = tl.dot(do0, tl.trans(v0), input_precision=PRECISION)
        if D1 > 0:
            k1 = tl.load(k_rows + d1[None, :], mask=n_mask[:, None] & (d1 < D)[None, :], other=0.0)
            v1 = tl.load(v_rows + d1[None, :], mask=n_mask[:, None] & (d1 < D)[None, :], other=0.0)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PRECISION)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=PRECISION)
        # Padded keys must get p = 0 exactly: exp2(0 - lse2) can overflow to inf, and inf * 0 is NaN.
        p = tl.exp2(tl.where(n_mask[None, :], s * qk_scale, float("-inf")) - lse2[:, None])
        ds = (p * (dp - delta[:, None])).to(k0.dtype)
        dq0 = tl.dot(ds, k0, dq0, input_precision=PRECISION)
        if D1 > 0:
            dq1 = tl.dot(ds, k1, dq1, input_precision=PRECISION)

    dq_rows = DQ + b * sgb + h * sgh + offs_m[:, None] * sgm
    tl.store(dq_rows + d0[None, :], (dq0 * scale).to(DQ.dtype.element_ty), mask=m_mask[:, None] & (d0 < D)[None, :])
    if D1 > 0:
        tl.store(dq_rows + d1[None, :], (dq1 * scale).to(DQ.dtype.element_ty),
                 mask=m_mask[:, None] & (d1 < D)[None, :])


# ----------------------------------------------------------------------------------------- GPU configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head dim, chosen as for the forward (see attention.py). At
# head dim 160 only BLOCK_M = 16 dK/dV tiles stay spill-free on sm_86: each program holds k, v, dk and dv tiles.

_DKDV = {48: [(32, 128, 8, 3), (64, 64, 8, 3), (64, 32, 8, 3)],
         64: [(64, 128, 8, 3), (64, 128, 8, 2), (128, 32, 4, 3)],
         80: [(64, 128, 8, 2), (32, 128, 8, 3), (32, 32, 4, 3)],
         128: [(128, 32, 4, 2), (32, 128, 8, 2), (128, 32, 8, 2)],
         160: [(16, 64, 4, 2), (16, 64, 8, 2), (16, 32, 4, 2)],
         256: [(32, 32, 4, 2), (16, 64, 8, 2), (32, 32, 8, 2)]}
_DQ = {48: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 4, 3)],
       64: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 4, 3)],
       80: [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
       128: [(128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)],
       160: [(64, 32, 4, 2), (64, 32, 8, 2), (64, 32, 4, 1)],
       256: [(32, 64, 4, 1), (32, 64, 8, 1), (32, 32, 4, 2)]}
_DELTA = {256: [(64, 4)]}  # (BLOCK_M, num_warps): memory bound, one config
_SPLIT_ROWS = 128  # dK/dV query chunks are multiples of this (a multiple of every BLOCK_M above)


def _lq_splits(Lq: int, Lk: int, BH: int, device: torch.device) -> int:
    """Rows per dK/dV chunk: split the query loop until there are about two waves of programs."""
    if interpreting() and not is_recording():  # a recording sizes for its target GPU, interpreter or not
        return 24  # test sizes: several chunks, ending mid-tile (16), so the chunk-end mask is exercised
    key_blocks = cdiv(Lk, 128) * BH
    splits = max(1, min(cdiv(2 * gpu_arch(device).multiprocessors, key_blocks), cdiv(Lq, _SPLIT_ROWS)))
    return cdiv(cdiv(Lq, splits), _SPLIT_ROWS) * _SPLIT_ROWS


def flash_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, scale: float, needs: Tuple[bool, bool, bool]
                   ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """dq, dk, dv (None where not needed) for upstream gradient do."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    do = unit_stride(do)
    d0, d1 = head_split(D)
    pieces = dict(D=D, D0=d0, D1=d1)
    meta = dict(pieces, PRECISION=precision(q.dtype))
    delta = torch.empty_like(lse)
    (block_m, warps), = _DELTA[256]
    _attn_bwd_delta(lambda m: (cdiv(Lq, m["BLOCK_M"]), B * H),
                    o, do, delta, *o.stride()[:3], *do.stride()[:3], H, Lq,
                    configs=[dict(BLOCK_M=block_m, num_warps=warps)], **pieces)
    dq = dk = dv = None
    if needs[1] or needs[2]:
        rows = _lq_splits(Lq, Lk, B * H, q.device)
        splits = cdiv(Lq, rows)
        dk_part = torch.empty((splits, B, H, Lk, D), device=q.device, dtype=torch.float32)
        dv_part = torch.empty_like(dk_part)
        _attn_bwd_dkdv(lambda m: (cdiv(Lk, m["BLOCK_N"]), B * H, splits),
                       q, k, v, do, dk_part, dv_part, lse, delta,
                       *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk_part.stride()[:4],
                       H, Lq, Lk, rows, scale, scale * LOG2E,
                       configs=configs_for(_DKDV, d0 + d1), **meta)
        dk = dk_part.sum(0).to(k.dtype)
        dv = dv_part.sum(0).to(v.dtype)
    if needs[0]:
        dq = torch.empty_like(q)
        _attn_bwd_dq(lambda m: (cdiv(Lq, m["BLOCK_M"]), B * H),
                     q, k, v, do, dq, lse, delta,
                     *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
                     H, Lq, Lk, scale, scale * LOG2E,
                     configs=configs_for(_DQ, d0 + d1), **meta)
    return dq, dk, dv
