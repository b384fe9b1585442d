"""Kernel benchmark: the Triton ops against torch on Stable Diffusion's real shapes, forward and forward+backward.

    python benchmarks/kernel_ops.py [--dtype fp16|bf16] [--batch 2] [--only attention,group_norm,layer_norm,geglu]

Shapes are SD at 512x512 (64x64 latent) with batch 2 (classifier-free guidance): SD1.x attention with 8 heads
of dim 40/80/160 at 4096/1024/256/64 tokens, cross-attention over 77 text tokens, SD2.x heads of dim 64
(5/10/20 heads), and the VAE's single 512-dim head (which our dispatch sends to SDPA). Baselines: SDPA's flash
and memory-efficient backends (torch.nn.attention.sdpa_kernel), eager torch (explicit softmax(q k^T) v; for
the norms and GEGLU the `*_reference` functions, i.e. what runs when Triton is off) and, for the norms, torch's
native fused op in the input dtype (what diffusers runs).

Times are medians over CUDA events with the L2 cache flushed before every call; "err" is the forward output's
max abs error / std against the fp32 reference, a sanity check that the timed kernel computes the right thing.
Writes benchmarks/results/kernels_<gpu>.md. Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from common import write_table

from imagic import kernels
from imagic.kernels.attention import supported as attention_supported

Fn = Callable[[], object]

ATTENTION_SHAPES = [  # (label, heads, Lq, Lk, head dim)
    ("SD1 self 64x64", 8, 4096, 4096, 40), ("SD1 self 32x32", 8, 1024, 1024, 80),
    ("SD1 self 16x16", 8, 256, 256, 160), ("SD1 self 8x8", 8, 64, 64, 160),
    ("SD1 cross 64x64", 8, 4096, 77, 40), ("SD1 cross 32x32", 8, 1024, 77, 80),
    ("SD1 cross 16x16", 8, 256, 77, 160), ("SD1 cross 8x8", 8, 64, 77, 160),
    ("SD2 self 64x64", 5, 4096, 4096, 64), ("SD2 self 32x32", 10, 1024, 1024, 64),
    ("SD2 self 16x16", 20, 256, 256, 64), ("SD2 cross 64x64", 5, 4096, 77, 64),
    ("VAE mid 64x64", 1, 4096, 4096, 512),
]
GROUP_NORM_SHAPES = [  # (label, C, H, W, silu, batched); 32 groups. The VAE runs on one image (batch 1).
    ("UNet 320@64", 320, 64, 64, True, True), ("UNet 640@32", 640, 32, 32, True, True),
    ("UNet 1280@16", 1280, 16, 16, True, True), ("UNet 1280@8", 1280, 8, 8, True, True),
    ("transformer in 320@64", 320, 64, 64, False, True),
    ("VAE 512@64", 512, 64, 64, True, False), ("VAE 256@256", 256, 256, 256, True, False),
]
TOKEN_SHAPES = [("64x64", 4096, 320), ("32x32", 1024, 640), ("16x16", 256, 1280), ("8x8", 64, 1280)]


# ----------------------------------------------------------------------------------------------- timing

class Timer:
    """Median milliseconds of a CUDA callable, measured with CUDA events, L2 flushed before each call."""

    def __init__(self, target_ms: float = 150.0):
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # larger than any L2 so far
        self.target_ms = target_ms

    def __call__(self, fn: Fn) -> float:
        for _ in range(3):  # compile / autotune / allocator warm-up
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        reps = int(min(200, max(10, self.target_ms / max(start.elapsed_time(end), 1e-3))))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            self.flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
        return times[len(times) // 2]


def forward_backward(op: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]) -> Fn:
    """One forward and the backward into every input (autograd.grad: no .grad accumulation in the timing)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    upstream = torch.randn_like(op(*leaves))

    def run():
        return torch.autograd.grad(op(*leaves), leaves, upstream)
    return run


def try_time(timer: Timer, build: Callable[[], Fn]) -> Optional[float]:
    """Milliseconds of the callable `build()` returns, or None when this backend refuses the shape (SDPA flash
    with D > 256, say). Building runs the op once (forward_backward does), so it is inside the try too."""
    try:
        return timer(build())
    except RuntimeError:
        return None


def triton_op(op: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(*args):
        with kernels.use_triton(True, strict=True):
            return op(*args)
    return run


def sdpa(backend) -> Callable[..., torch.Tensor]:
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The textbook formula in the input dtype (diffusers' AttnProcessor without SDPA)."""
    return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1) @ v


# ------------------------------------------------------------------------------------------ benchmarks

def _ms(t: Optional[float]) -> str:
    return "n/a" if t is None else f"{t:.3f}"


def _row(op: str, label: str, pass_: str, ours: Optional[float], rate: str, unit: str, err: str,
         baselines: Dict[str, Optional[float]]) -> List[str]:
    best = min((t for t in baselines.values() if t is not None), default=None)
    speedup = "n/a" if best is None or ours is None else f"{best / ours:.2f}x"
    cols = [_ms(baselines[k]) if k in baselines else "-" for k in ("flash", "efficient", "native", "eager")]
    return [op, label, pass_, _ms(ours), f"{rate} {unit}", *cols, speedup, err]


def _rate(amount: float, ms: Optional[float], scale: float) -> str:
    return "n/a" if ms is None else f"{amount / (ms * 1e-3) / scale:.1f}"


def bench_attention(timer: Timer, batch: int, dtype: torch.dtype) -> List[List[str]]:
    from torch.nn.attention import SDPBackend

    rows = []
    for label, heads, lq, lk, d in ATTENTION_SHAPES:
        q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=dtype) for n in (lq, lk, lk))
        ours = triton_op(kernels.attention)
        name = "attention" if attention_supported(q, k, v) else "attention (SDPA fallback)"
        err = kernels.attention_reference(q, k, v).float()
        err = f"{(ours(q, k, v).float() - err).abs().max().item() / err.std().item():.1e}"
        impls = {"flash": sdpa(SDPBackend.FLASH_ATTENTION), "efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
                 "eager": eager_attention}
        flops = 4 * batch * heads * lq * lk * d  # two matmuls of 2*Lq*Lk*D flops per (batch, head)
        for pass_, factor, make in (("fwd", 1.0, lambda f: (lambda: f(q, k, v))),
                                    ("fwd+bwd", 3.5, lambda f: forward_backward(f, (q, k, v)))):
            t = try_time(timer, lambda: make(ours))
            base = {n: try_time(timer, lambda: make(f)) for n, f in impls.items()}
            rows.append(_row(name, f"{label} B{batch} H{heads} {lq}x{lk} D{d}", pass_, t,
                             _rate(flops * factor, t, 1e12), "TFLOP/s", err, base))
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def bench_norms(timer: Timer, batch: int, dtype: torch.dtype, only: set) -> List[List[str]]:
    rows = []
    size = torch.finfo(dtype).bits // 8
    cases: List[Tuple[str, str, Sequence[torch.Tensor], Callable, Callable, Callable, int]] = []
    for label, c, h, w, silu, batched in GROUP_NORM_SHAPES if "group_norm" in only else ():
        x = torch.randn(batch if batched else 1, c, h, w, device="cuda", dtype=dtype)
        wb = [torch.randn(c, device="cuda"), torch.randn(c, device="cuda")]  # fp32 parameters (autocast)

        def gn(x, w, b, silu=silu):
            return kernels.group_norm(x, 32, w, b, 1e-5, silu=silu)

        def gn_ref(x, w, b, silu=silu):
            return kernels.group_norm_reference(x, 32, w, b, 1e-5, silu=silu)

        def gn_native(x, w, b, silu=silu):
            y = F.group_norm(x, 32, w.to(x.dtype), b.to(x.dtype), 1e-5)
            return F.silu(y) if silu else y
        cases.append(("group_norm" + (" +silu" if silu else ""), f"{label} {tuple(x.shape)}", [x, *wb],
                      gn, gn_ref, gn_native, x.numel()))
    for label, tokens, dim in TOKEN_SHAPES if "layer_norm" in only else ():
        x = torch.randn(batch, tokens, dim, device="cuda", dtype=dtype)
        wb = [torch.randn(dim, device="cuda"), torch.randn(dim, device="cuda")]
        cases.append(("layer_norm", f"{label} {tuple(x.shape)}", [x, *wb],
                      lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5),
                      lambda x, w, b: kernels.layer_norm_reference(x, w, b, 1e-5),
                      lambda x, w, b: F.layer_norm(x, x.shape[-1:], w.to(x.dtype), b.to(x.dtype), 1e-5),
                      x.numel()))
    for label, tokens, dim in TOKEN_SHAPES if "geglu" in only else ():
        h = torch.randn(batch, tokens, 8 * dim, device="cuda", dtype=dtype)  # proj to 2 * (4 * dim)
        cases.append(("geglu", f"{label} {tuple(h.shape)}", [h], kernels.geglu, kernels.geglu_reference, None,
                      h.numel() // 2))

    for op, label, inputs, ours_fn, ref_fn, native_fn, n_out in cases:
        ours = triton_op(ours_fn)
        ref = ref_fn(*inputs).float()
        err = f"{(ours(*inputs).float() - ref).abs().max().item() / ref.std().item():.1e}"
        # Minimum traffic in bytes: norms read x, write y; backward reads x, dy, writes dx (parameters ignored).
        # GEGLU reads h (2F), writes y (F); backward reads h and dy, writes dh: 3F and 5F per row.
        fwd_bytes, bwd_bytes = ((3, 5) if op == "geglu" else (2, 3))
        impls = {"eager": ref_fn} | ({"native": native_fn} if native_fn else {})
        for pass_, amount, make in (("fwd", fwd_bytes, lambda f: (lambda: f(*inputs))),
                                    ("fwd+bwd", fwd_bytes + bwd_bytes, lambda f: forward_backward(f, inputs))):
            t = try_time(timer, lambda: make(ours))
            base = {n: try_time(timer, lambda: make(f)) for n, f in impls.items()}
            rows.append(_row(op, label, pass_, t, _rate(amount * n_out * size, t, 1e9), "GB/s", err, base))
    return rows


def gpu_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--only", default="attention,group_norm,layer_norm,geglu", help="comma-separated subset")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernel_ops.py: no CUDA device here; the kernel benchmark needs a GPU. Nothing to do.")
        return 0
    if not kernels.triton_available():
        print("benchmarks/kernel_ops.py: Triton is not installed; nothing to compare. `pip install triton`.")
        return 0
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    only = set(args.only.split(","))
    timer = Timer()
    rows: List[List[str]] = []
    if "attention" in only:
        rows += bench_attention(timer, args.batch, dtype)
    if only & {"group_norm", "layer_norm", "geglu"}:
        rows += bench_norms(timer, args.batch, dtype, only)
    header = ["op", "shape", "pass", "triton ms", "triton rate", "sdpa flash ms", "sdpa efficient ms",
              "torch native ms", "torch eager ms", "speedup vs fastest torch", "err"]
    notes = [
        f"- dtype {args.dtype}, batch {args.batch}. Median of CUDA-event timings, L2 flushed before each call; "
        "the first calls (Triton compilation and autotuning) are excluded.",
        "- Attention TFLOP/s count 4*B*H*Lq*Lk*D for the forward (QK^T and PV); forward+backward counts 3.5x that "
        "(the backward's five matmuls: recomputed QK^T, dV, dP, dQ, dK = 2.5x the forward).",
        "- Norm and GEGLU GB/s count the minimum traffic: forward reads x and writes y, backward reads x and dy "
        "and writes dx (GEGLU: 3 and 5 halves of a row); parameters and statistics are ignored.",
        "- torch eager = explicit softmax(q k^T) v (attention) or our fp32 `*_reference` (the path without "
        "Triton); torch native = F.group_norm/F.layer_norm in the input dtype (+ F.silu).",
        "- err = forward max abs error / std vs the fp32 reference. n/a: the backend refuses the shape; "
        "-: not applicable.",
    ]
    write_table(f"kernels_{gpu_slug()}_{args.dtype}", f"Triton kernels vs torch ({args.dtype})", header, rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
