"""Scaled dot-product attention, FlashAttention-2 style: softmax(q k^T * scale) v without the Lq x Lk matrix.

Shapes: q (B, H, Lq, D), k and v (B, H, Lk, D); returns (B, H, Lq, D) in q's dtype.

Forward (Dao 2023, "FlashAttention-2", Alg. 1). For a block of query rows, stream over key blocks keeping
a running row maximum m, a running denominator l and an unnormalised output acc (all fp32):

    s   = q k_j^T * scale                       (scores of this key block)
    m'  = max(m, rowmax(s));  p = exp(s - m');  alpha = exp(m - m')
    l   = l * alpha + rowsum(p);  acc = acc * alpha + p v_j;  m = m'
    o   = acc / l,  lse = m + log(l)             (lse = logsumexp of the row, saved in fp32)

We work in base 2: `qk_scale = scale * log2(e)` is folded into the scores once, so every exponential is an
`exp2` (one MUFU instruction on NVIDIA GPUs) and lse is converted back to natural log when stored. The backward
pass (attention_backward.py) recomputes the probabilities from lse.

The head dimension runs in two power-of-two pieces D0 + D1 (attention_tiles.py): 40 = 32 + 16, 80 = 64 + 16,
160 = 128 + 32, 64 = 64 + 0, so at most 17% of the MMA work is on padding instead of 37.5%.

Ragged shapes: rows past Lq and keys past Lk are masked (keys get score -inf); columns past D in the second
piece are masked loads of zeros. Head dims above 256 (the VAE's single 512-dim head) go to torch SDPA, as do
fp32 inputs on a GPU (SDPA's memory-efficient kernel; ours would run without tensor cores) and bf16 before sm_80.
fp32 runs here under the Triton interpreter, for the tests, with exact fp32 dots.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .attention_backward import flash_backward
from .attention_tiles import LOG2E, configs_for, head_split, precision, unit_stride
from .dispatch import backward_with_fallback, triton_enabled, with_fallback
from .launch import cdiv, gpu_arch, interpreting, triton_kernel

try:
    import triton.language as tl
except ImportError:  # the reference/SDPA path works without Triton
    tl = None

MAX_HEAD_DIM = 256
GPU_DTYPES = (torch.float16, torch.bfloat16)
INTERPRETER_DTYPES = (torch.float16, torch.float32)  # the interpreter gets bf16 silently wrong


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: Optional[float] = None) -> torch.Tensor:
    """The spec: explicit softmax attention accumulated in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)


# ----------------------------------------------------------------------------------------------- kernel

@triton_kernel(key=("Lq", "Lk", "D"), interpret=dict(BLOCK_M=16, BLOCK_N=16))
def _attn_fwd(Q, K, V, O, LSE,
              sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
              H, Lq, Lk, qk_scale,
              D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head); online softmax over all key blocks."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, D0)
    m_mask = offs_m < Lq
    q_rows = Q + b * sqb + h * sqh + offs_m[:, None] * sqm
    q0 = tl.load(q_rows + d0[None, :], mask=m_mask[:, None] & (d0 < D)[None, :], other=0.0)
    acc0 = tl.zeros([BLOCK_M, D0], tl.float32)         # running unnormalised output, first piece
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        q1 = tl.load(q_rows + d1[None, :], mask=m_mask[:, None] & (d1 < D)[None, :], other=0.0)
        acc1 = tl.zeros([BLOCK_M, D1], tl.float32)     # second piece
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scaled scores (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)                 # running softmax denominator
    for start_n in range(0, Lk, BLOCK_N):
        n = start_n + offs_n
        n_mask = n < Lk
        k_rows = k_base + n[:, None] * skn
        v_rows = v_base + n[:, None] * svn
        k0 = tl.load(k_rows + d0[None, :], mask=n_mask[:, None] & (d0 < D)[None, :], other=0.0)
        s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
        if D1 > 0:
            k1 = tl.load(k_rows + d1[None, :], mask=n_mask[:, None] & (d1 < D)[None, :], other=0.0)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PRECISION)
        s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))  # keys past Lk get no weight
        m_new = tl.maximum(m_i, tl.max(s, 1))           # finite: every block holds at least one real key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)                     # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        v0 = tl.load(v_rows + d0[None, :], mask=n_mask[:, None] & (d0 < D)[None, :], other=0.0)
        p = p.to(v0.dtype)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=PRECISION)
        if D1 > 0:
            v1 = tl.load(v_rows + d1[None, :], mask=n_mask[:, None] & (d1 < D)[None, :], other=0.0)
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PRECISION)

    o_rows = O + b * sob + h * soh + offs_m[:, None] * som
    inv_l = 1.0 / l_i[:, None]
    tl.store(o_rows + d0[None, :], (acc0 * inv_l).to(O.dtype.element_ty), mask=m_mask[:, None] & (d0 < D)[None, :])
    if D1 > 0:
        tl.store(o_rows + d1[None, :], (acc1 * inv_l).to(O.dtype.element_ty),
                 mask=m_mask[:, None] & (d1 < D)[None, :])
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_mask)


# ----------------------------------------------------------------------------------------- GPU configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates by padded head dim D0 + D1 (48 for 40, 80, 160: SD1; 64:
# SD2; 128 and 256 for other models), autotuned per (Lq, Lk, D, dtype) among those that fit the GPU (launch.py).
# Chosen by benchmarks/attention_configs.py: every one compiles without spills and within 99 KB of shared memory
# for sm_80, sm_86, sm_89 and sm_90 at 4096 x 4096 and 4096 x 77 (the log is in benchmarks/results/); the
# two biggest tiles, then the best with BLOCK_N <= 32 for Lk = 77. Wider heads need smaller tiles: the fp32
# accumulators live in registers. benchmarks/kernel_compile.py checks every launch the models make.

_FWD = {48: [(128, 128, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3)],
        64: [(128, 128, 8, 2), (128, 64, 4, 3), (128, 32, 4, 3)],
        80: [(128, 64, 8, 3), (64, 128, 4, 2), (128, 32, 4, 3)],
        128: [(128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 8, 2)],
        160: [(64, 32, 4, 2), (64, 32, 8, 2), (64, 32, 4, 1)],
        256: [(64, 64, 8, 1), (32, 128, 8, 1), (64, 32, 4, 2)]}


# -------------------------------------------------------------------------------------------- launchers

def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """o (layout of q) and lse (B, H, Lq) fp32, the natural-log logsumexp of each scaled score row."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    d0, d1 = head_split(D)
    _attn_fwd(lambda meta: (cdiv(Lq, meta["BLOCK_M"]), B * H),
              q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
              H, Lq, Lk, scale * LOG2E,
              configs=configs_for(_FWD, d0 + d1), D=D, D0=d0, D1=d1, PRECISION=precision(q.dtype))
    return o, lse


class _FlashAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, o and the fp32 logsumexp; the backward recomputes P blockwise."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
        o, lse = flash_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: torch.Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        grads = backward_with_fallback(
            "attention", lambda: flash_backward(do, q, k, v, o, lse, ctx.scale, needs),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=ctx.scale), (q, k, v), needs, do)
        return (*grads, None)


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Shapes, dtypes and GPUs the Triton path handles; anything else goes to torch SDPA."""
    dtypes = INTERPRETER_DTYPES if interpreting() and q.device.type == "cpu" else GPU_DTYPES
    if q.is_cuda and not gpu_arch(q.device).tensor_core_dots:
        return False
    return (q.dim() == 4 and k.dim() == 4 and v.shape == k.shape and q.shape[:2] == k.shape[:2]
            and q.shape[-1] == k.shape[-1] and 0 < q.shape[-1] <= MAX_HEAD_DIM
            and q.dtype == k.dtype == v.dtype and q.dtype in dtypes
            and q.numel() > 0 and k.numel() > 0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v, scale defaulting to D**-0.5: Triton on CUDA when supported, else torch SDPA."""
    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    if triton_enabled("attention", q, k, v) and supported(q, k, v):
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        return with_fallback("attention", (q, k, v), lambda: _FlashAttention.apply(q, k, v, s), sdpa)
    return sdpa()
