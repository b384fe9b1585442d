"""How the attention kernels' config tables were chosen: compile candidate tiles, keep what fits everywhere.

    python -m benchmarks.attention_configs            # prints candidate tables for _FWD, _DKDV, _DQ

For each padded head dim of the tables (D0 + D1: 48 for SD1's 40, 64 for SD2, 80, 160, and 128/256 for other
models) and each attention kernel, every (BLOCK_M, BLOCK_N, num_warps, num_stages) in a grid is compiled (bf16,
benchmarks/cubin.py) for sm_86 first, the tightest target (99 KB of shared memory, and its register allocation
spills where sm_80's does not) at 4096 x 4096. A config is kept when it also compiles without spilling, within
99 KB of shared memory, for sm_80, sm_86, sm_89 and sm_90 at SD's self-attention (4096 x 4096) and
cross-attention (4096 x 77) shapes. The table keeps up to three per kernel and head dim: the two with the biggest
tiles (most reuse of each loaded tile; see `_preference`) and the best one with BLOCK_N <= 32 (less padding at
Lk = 77). Without a GPU this cannot time them; autotuning chooses among the kept ones on the user's GPU.
"""
from __future__ import annotations

import argparse
import itertools
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from benchmarks.cubin import bind, problems
from benchmarks.kernel_compile import compile_all
from imagic.kernels import launch as L
from imagic.kernels.attention import flash_forward
from imagic.kernels.attention_backward import flash_backward

HEAD_DIMS = {48: 40, 64: 64, 80: 80, 128: 128, 160: 160, 256: 256}  # table key (padded) -> a head dim using it
KERNELS = ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")
Row = Tuple[int, int, int, int]


def launches(d: int, lk: int) -> Dict[str, L.Launch]:
    """The forward and backward launches of one SD-sized attention call with head dim d, by kernel name."""
    q = torch.empty(1, 8, 4096, d, device="meta", dtype=torch.float16)
    kv = torch.empty(1, 8, lk, d, device="meta", dtype=torch.float16)
    lse = torch.empty(1, 8, 4096, device="meta")
    with L.recording(L.TARGETS[86]) as found:
        flash_forward(q, kv, kv, d ** -0.5)
        flash_backward(q, q, kv, kv, q, lse, d ** -0.5, (True, True, True))
    return {x.kernel.fn.__name__: x for x in found}


def grid(padded: int) -> List[Row]:
    blocks_m = (16, 32, 64, 128) if padded > 128 else (32, 64, 128)
    blocks_n = (32, 64, 128)
    stages = (1, 2) if padded > 128 else (2, 3)
    return [(m, n, w, s) for m, n, w, s in itertools.product(blocks_m, blocks_n, (4, 8), stages)
            if 16 * 16 * w <= m * n * 2 and m * n <= (128 * 64 if padded > 128 else 128 * 128)]


def survivors(rows: List[Row], kernel: str, d: int, archs: Sequence[int], lengths: Sequence[int], jobs: int
              ) -> List[Row]:
    config = lambda r: dict(BLOCK_M=r[0], BLOCK_N=r[1], num_warps=r[2], num_stages=r[3])  # noqa: E731
    variants, owners = [], []
    for lk in lengths:
        launch = launches(d, lk)[kernel]
        for cc in archs:
            for r in rows:
                variants.append(bind(launch, config(r), L.TARGETS[cc], torch.bfloat16))
                owners.append((r, cc))
    results = compile_all(variants, jobs)
    bad = {r for (r, cc), res in zip(owners, results)
           if problems(res, L.TARGETS[cc], True) or res.shared > L.TARGETS[86].shared_memory}
    return [r for r in rows if r not in bad]


def _preference(kernel: str) -> Callable[[Row], Tuple]:
    """Biggest tile, then the biggest resident block (the rows a program keeps while it streams the others:
    queries in the forward and dQ kernels, keys in dK/dV), then deeper pipelining, then fewer warps."""
    resident = 1 if kernel == "_attn_bwd_dkdv" else 0
    return lambda r: (-r[0] * r[1], -r[resident], -r[3], r[2])


def choose(rows: List[Row], kernel: str, d: int, jobs: int) -> List[Row]:
    """Two biggest tiles, then the best with BLOCK_N <= 32, each verified on every target and both lengths (in
    order of preference, two at a time, so that most candidates need only the sm_86 compile)."""
    chosen: List[Row] = []
    key = _preference(kernel)
    for wanted, pool in ((2, sorted(rows, key=key)), (3, sorted((r for r in rows if r[1] <= 32), key=key))):
        pool = [r for r in pool if r not in chosen]
        while len(chosen) < wanted and pool:
            batch, pool = pool[:2], pool[2:]
            ok = survivors(batch, kernel, d, [80, 86, 89, 90], [4096, 77], jobs)
            chosen += ok[:wanted - len(chosen)]
    return chosen


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--dims", type=int, nargs="*", default=sorted(HEAD_DIMS), help="padded head dims (table keys)")
    p.add_argument("--kernels", nargs="*", default=KERNELS)
    args = p.parse_args(argv)
    for kernel in args.kernels:
        table = {}
        for padded in args.dims:
            d = HEAD_DIMS[padded]
            rows = survivors(grid(padded), kernel, d, [86], [4096], args.jobs)
            table[padded] = choose(rows, kernel, d, args.jobs)
            print(f"{kernel} D0+D1={padded}: {len(rows)} pass on sm_86; chosen {table[padded]}", flush=True)
        print(f"{kernel} = {table}", flush=True)


if __name__ == "__main__":
    main()
