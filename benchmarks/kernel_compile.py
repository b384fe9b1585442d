"""Compile every Triton kernel launch the models make, for real GPUs, on a machine without one.

    python -m benchmarks.kernel_compile                 # every launch x config x arch -> results/kernel_compile.md
    python -m benchmarks.kernel_compile --subset        # one launch per kernel, sm_80/86/90, bf16 (the test's run)

How: the real models (SD1.5, SD2.x and SDXL UNets, the VAE, every text encoder: SD1's, SD2's and SDXL's two
towers) run forward and backward on `meta` tensors
under `imagic.kernels.launch.recording(arch)`, so the project's own launchers say which kernels they launch with
which arguments and candidate configs, and nothing is computed. Each distinct compilation (benchmarks/cubin.py:
same kernel, argument types, specialisation and config) is compiled for each target in `launch.TARGETS`, fp16
and bf16 (bf16 from sm_80), and checked: it compiles, does not spill, fits the arch's shared memory, and every
kernel with a `tl.dot` uses tensor cores. The same rule is what `launch.TritonKernel` applies on a user's GPU
before autotuning, so a config flagged here is never launched there: this table says which configs remain.

The useful share of the MMA work is unpadded / padded FLOPs of the dots: the head dimension D against the two
power-of-two pieces D0 + D1 it runs in, and ("with tiles") also the query and key tiles past the sequence ends.
Recorded in fp16 (the models' launches are the same in bf16). Needs TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import json
import multiprocessing
import os
import sys
import tempfile
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from benchmarks import common
from benchmarks.cubin import Compiled, Variant, bind, compile_for, problems
from imagic.clip import build_text_encoder
from imagic.config import ModelConfig, preset
from imagic.kernels import launch as L
from imagic.kernels import use_triton
from imagic.sdxl import Conditioner
from imagic.unet import UNetModel
from imagic.vae import AutoencoderKL

HALF = torch.float16
Workload = Callable[[], None]


# ---------------------------------------------------------------------------------------------- workloads

def _meta(factory: Callable[[], nn.Module], dtype: torch.dtype, norms_fp32: bool = False) -> nn.Module:
    with torch.device("meta"):
        model = factory().to(dtype)
    if norms_fp32:  # full fine-tuning: fp32 master weights under autocast, so norms see half x, fp32 weight
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.float()
    return model


def _vector(cfg: ModelConfig, batch: int, requires_grad: bool = False) -> Optional[torch.Tensor]:
    """SDXL's `y` (pooled vector + size features) for a vector-conditioned UNet, else None (SD 1.x / 2.x)."""
    if cfg.unet.num_classes is None:
        return None
    return torch.empty(batch, cfg.unet.adm_in_channels, device="meta", dtype=HALF, requires_grad=requires_grad)


def unet_training(cfg: ModelConfig, image: int, norms_fp32: bool) -> Workload:
    """One step of Imagic's stages 1 and 2 (batch 1): forward, then backward to every weight and the context
    (on SDXL also to `y`, whose pooled part stage 1 optimises)."""
    def run() -> None:
        unet = _meta(lambda: UNetModel(cfg.unet), HALF, norms_fp32)
        s = image // 8
        x = torch.empty(1, cfg.unet.in_channels, s, s, device="meta", dtype=HALF)
        context = torch.empty(1, 77, cfg.unet.context_dim, device="meta", dtype=HALF, requires_grad=True)
        unet(x, torch.zeros(1, device="meta", dtype=torch.long), context,
             _vector(cfg, 1, requires_grad=True)).float().sum().backward()
    return run


def unet_sampling(cfg: ModelConfig, image: int) -> Workload:
    """One guided DDIM step: conditional and unconditional rows in one batch of 2, forward only."""
    def run() -> None:
        unet = _meta(lambda: UNetModel(cfg.unet), HALF).requires_grad_(False)
        s = image // 8
        x = torch.empty(2, cfg.unet.in_channels, s, s, device="meta", dtype=HALF)
        unet(x, torch.zeros(2, device="meta", dtype=torch.long),
             torch.empty(2, 77, cfg.unet.context_dim, device="meta", dtype=HALF), _vector(cfg, 2))
    return run


def vae_roundtrip(cfg: ModelConfig, image: int) -> Workload:
    """Encode the input image and decode a sample, in fp32 as the editor keeps the VAE. The halves are called
    without `encode`/`decode`, whose autocast guard has no meta-device form."""
    def run() -> None:
        vae = _meta(lambda: AutoencoderKL(cfg.vae), torch.float32).requires_grad_(False)
        vae.quant_conv(vae.encoder(torch.empty(1, 3, image, image, device="meta")))
        s = image // cfg.vae.downsample_factor
        vae.decoder(vae.post_quant_conv(torch.empty(1, cfg.vae.embed_dim, s, s, device="meta")))
    return run


def text_encoding(cfg: ModelConfig) -> Workload:
    """The prompt's encoding: the text encoder, or on SDXL both towers (`imagic.sdxl.Conditioner`)."""
    def run() -> None:
        ids = torch.zeros(1, 77, device="meta", dtype=torch.long)
        if cfg.text2 is not None:
            _meta(lambda: Conditioner(cfg), HALF).requires_grad_(False)(ids, ids)
        else:
            _meta(lambda: build_text_encoder(cfg.text), HALF).requires_grad_(False)(ids)
    return run


def workloads(subset: bool) -> Dict[str, Workload]:
    sd1, sd2, sd2v, sdxl = preset("sd1"), preset("sd2"), preset("sd2-v"), preset("sdxl")
    if subset:
        return {"SD1.5 UNet train 512": unet_training(sd1, 512, False), "SD1 text": text_encoding(sd1)}
    return {
        "SD1.5 UNet train 512": unet_training(sd1, 512, False),
        "SD1.5 UNet full fine-tune 512": unet_training(sd1, 512, True),
        "SD1.5 UNet sample 512": unet_sampling(sd1, 512),
        "SD2 UNet train 512": unet_training(sd2, 512, False),
        "SD2 UNet train 768": unet_training(sd2v, 768, False),
        "SD2 UNet full fine-tune 768": unet_training(sd2v, 768, True),
        "SD2 UNet sample 768": unet_sampling(sd2v, 768),
        "VAE 512": vae_roundtrip(sd1, 512),
        "VAE 768": vae_roundtrip(sd2v, 768),
        "SDXL UNet train 1024": unet_training(sdxl, 1024, False),
        "SDXL UNet full fine-tune 1024": unet_training(sdxl, 1024, True),
        "SDXL UNet sample 1024": unet_sampling(sdxl, 1024),
        "VAE 1024": vae_roundtrip(sdxl, 1024),
        "SD1 text": text_encoding(sd1),
        "SD2 text": text_encoding(sd2),
        "SDXL text": text_encoding(sdxl),
    }


def record(arch: L.GpuArch, work: Dict[str, Workload]) -> List[Tuple[str, L.Launch]]:
    """(workload name, launch) for every kernel launch the workloads make, sized for `arch`."""
    found = []
    with use_triton(True, strict=True):
        for name, run in work.items():
            with L.recording(arch) as launches:
                run()
            found += [(name, launch) for launch in launches]
    return found


# ---------------------------------------------------------------------------------------------- variants

def is_dot_kernel(kernel: L.TritonKernel) -> bool:
    return "tl.dot(" in inspect.getsource(kernel.fn)


def mma_flops(launch: L.Launch, config: L.Config) -> Optional[Tuple[float, float, float]]:
    """(useful, padded over the head dim only, padded over head dim and tiles) FLOPs of an attention launch's
    dots, up to a common factor (the three-dot and four-dot kernels pad alike); None for other kernels."""
    meta = launch.meta
    if "D0" not in meta or "BLOCK_N" not in config:
        return None
    named = dict(zip(launch.kernel.jit.arg_names, launch.args))
    lq, lk, d = named["Lq"], named["Lk"], meta["D"]
    bh = named["H"] * next(a for a in launch.args if isinstance(a, torch.Tensor)).shape[0]
    pad = meta["D0"] + meta["D1"]
    tile = lambda n, b: L.cdiv(n, b) * b  # noqa: E731
    return (bh * lq * lk * d, bh * lq * lk * pad, bh * tile(lq, config["BLOCK_M"]) * tile(lk, config["BLOCK_N"]) * pad)


def variants(found: List[Tuple[str, L.Launch]], arch: L.GpuArch, dtypes: Sequence[torch.dtype]
             ) -> Dict[Tuple, Dict[str, Any]]:
    """Distinct compilations (Variant.key) -> the variant, the launches it serves and their MMA FLOPs."""
    out: Dict[Tuple, Dict[str, Any]] = {}
    for name, launch in found:
        for half in dtypes:
            for config in launch.configs:
                v = bind(launch, config, arch, half)
                entry = out.setdefault(v.key, dict(variant=v, dot=is_dot_kernel(launch.kernel), shapes=set(),
                                                   workloads=set(), flops=[0.0, 0.0, 0.0]))
                entry["shapes"].add(_shape(launch))
                entry["workloads"].add(name)
                flops = mma_flops(launch, config)
                if flops:
                    entry["flops"] = [a + b for a, b in zip(entry["flops"], flops)]
    return out


def _shape(launch: L.Launch) -> str:
    named = dict(zip(launch.kernel.jit.arg_names, launch.args))
    if "Lk" in named:
        return f"{named['Lq']}x{named['Lk']}"
    if "Lq" in named:
        return f"{named['Lq']} rows"
    first = next(a for a in launch.args if isinstance(a, torch.Tensor))
    return "x".join(map(str, first.shape))


# ---------------------------------------------------------------------------------------------- compiling

_JOBS: List[Variant] = []


def _compile_job(i: int) -> Compiled:
    return compile_for(_JOBS[i])


def compile_all(jobs: List[Variant], processes: int) -> List[Compiled]:
    """Compile in a fork pool (the jobs are inherited, not pickled) with a fresh Triton cache (honest times)."""
    global _JOBS
    _JOBS = jobs
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="imagic-triton-cache-")
    if processes <= 1:
        return [_compile_job(i) for i in range(len(jobs))]
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_job, range(len(jobs)), chunksize=1))


def _config_text(v: Variant) -> str:
    c = {**{k: x for k, x in v.constexprs.items() if k.startswith("BLOCK")}, **v.config}
    tiles = "x".join(str(v) for k, v in c.items() if k.startswith("BLOCK"))
    return f"{tiles} w{c.get('num_warps', 4)} s{c.get('num_stages', 3)}"


def _share(flops: List[float]) -> Tuple[str, str]:
    if not flops[0]:
        return "", ""
    return f"{flops[0] / flops[1]:.0%}", f"{flops[0] / flops[2]:.0%}"


def run(subset: bool, archs: Sequence[int], processes: int) -> List[Dict[str, Any]]:
    """Every distinct compilation on every target, with its measurements and problems, as JSON-ready rows."""
    work = workloads(subset)
    entries: List[Dict[str, Any]] = []
    for cc in archs:
        arch = L.TARGETS[cc]
        dtypes = [torch.bfloat16] if subset else [d for d in (torch.float16, torch.bfloat16) if arch.supports(d)]
        found = record(arch, work)
        if subset:  # one launch per kernel: the widest head dim for attention (the hardest to fit)
            widest: Dict[str, Tuple[str, L.Launch]] = {}
            for name, launch in found:
                k = launch.kernel.fn.__name__
                if k not in widest or launch.meta.get("D", 0) > widest[k][1].meta.get("D", 0):
                    widest[k] = (name, launch)
            found = list(widest.values())
        entries += [dict(e, arch=arch) for e in variants(found, arch, dtypes).values()]
    results = compile_all([e["variant"] for e in entries], processes)
    rows = []
    for e, r in zip(entries, results):
        v, arch = e["variant"], e["arch"]
        head, tiles = _share(e["flops"])
        rows.append(dict(kernel=v.kernel, arch=f"sm_{v.cc}", gpu=arch.name, dtype=v.dtype,
                         D=v.constexprs.get("D", ""), pieces=(f"{v.constexprs['D0']}+{v.constexprs['D1']}"
                                                              if "D0" in v.constexprs else ""),
                         config=_config_text(v), shapes=sorted(e["shapes"]), workloads=sorted(e["workloads"]),
                         dot=e["dot"], shared_limit=arch.shared_memory, useful_head=head, useful_tiles=tiles,
                         **vars(r), problems=problems(r, arch, e["dot"])))
    return rows


# ---------------------------------------------------------------------------------------------- report

def summary(rows: List[Dict[str, Any]]) -> List[List[Any]]:
    by = defaultdict(list)
    for r in rows:
        by[(r["arch"], r["gpu"], r["dtype"])].append(r)
    out = []
    for (arch, gpu, dtype), rs in sorted(by.items()):
        spill = sum(1 for r in rs if any(p.startswith("spills") for p in r["problems"]))
        smem = sum(1 for r in rs if any("shared memory" in p for p in r["problems"]))
        out.append([arch, gpu, dtype, len(rs), sum(1 for r in rs if not r["error"]), spill, smem,
                    sum(1 for r in rs if r["dot"] and r["mma"] == 0 and not r["error"]),
                    max(r["registers"] for r in rs), f"{sum(r['seconds'] for r in rs):.0f}"])
    return out


def unfit_launches(rows: List[Dict[str, Any]]) -> List[str]:
    """Launch groups (kernel, arch, dtype, D, shapes) where no candidate config passes: those would go to torch."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["kernel"], r["arch"], r["dtype"], r["D"], tuple(r["shapes"]))].append(r)
    return [f"{k} {a} {d} D={hd} {list(s)[:3]}" for (k, a, d, hd, s), rs in sorted(groups.items(), key=str)
            if all(r["problems"] for r in rs)]


def write_report(rows: List[Dict[str, Any]], name: str) -> None:
    header = ["kernel", "arch", "dtype", "D (pieces)", "config", "regs", "stack B", "spill st/ld B",
              "shared KB / limit", "MMA", "useful (head / +tiles)", "compile s", "launch shapes", "verdict"]
    table = [[r["kernel"], r["arch"], r["dtype"], f"{r['D']} ({r['pieces']})" if r["pieces"] else r["D"],
              r["config"], r["registers"], r["stack"], f"{r['spill_stores']}/{r['spill_loads']}",
              f"{r['shared'] / 1024:.0f} / {r['shared_limit'] // 1024}", r["mma"] if r["dot"] else "-",
              f"{r['useful_head']} / {r['useful_tiles']}" if r["useful_head"] else "-", f"{r['seconds']:.1f}",
              ", ".join(r["shapes"][:4]) + (" ..." if len(r["shapes"]) > 4 else ""),
              "; ".join(r["problems"]) or "ok"] for r in sorted(rows, key=lambda r: (r["kernel"], r["arch"],
                                                                                       r["dtype"], str(r["D"])))]
    unfit = unfit_launches(rows)
    notes = ["## Per arch and dtype", "", common.markdown_table(
        ["arch", "GPU", "dtype", "variants", "compiled", "spilling", "over shared memory", "dot kernels without MMA",
         "max regs", "compile s (sum)"], summary(rows)), "",
        "Launches with no passing config (they would run on the torch path): " + ("; ".join(unfit) or "none") + ".",
        "", "Verdicts follow `benchmarks/cubin.problems`, the rule `imagic.kernels.launch` applies before "
        "autotuning on a user's GPU: a flagged config is dropped there. `useful` = unpadded / padded MMA FLOPs "
        "(head dimension only, then with the query/key tiles past the sequence ends), FLOP-weighted over the "
        "launches the variant serves. Shapes are Lq x Lk for attention, the first tensor's shape otherwise."]
    common.write_table(name, "Triton kernels compiled for real GPUs (on a CPU)", header, table, notes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subset", action="store_true", help="one launch per kernel, bf16 on sm_80/86/90")
    p.add_argument("--archs", type=int, nargs="*", help="compute capabilities (default: all of launch.TARGETS)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    p.add_argument("--json", help="also write every row as JSON here")
    p.add_argument("--name", default="kernel_compile", help="results file name (benchmarks/results/<name>.md)")
    p.add_argument("--no-table", action="store_true", help="skip the markdown table (tests)")
    args = p.parse_args(argv)
    if L.interpreting():
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the compiler this checks")
    archs = args.archs or ([80, 86, 90] if args.subset else sorted(L.TARGETS))
    rows = run(args.subset, archs, args.jobs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    if not args.no_table:
        write_report(rows, args.name)
    bad = [r for r in rows if r["problems"]]
    print(f"{len(rows)} compilations, {len(bad)} with problems, {len(unfit_launches(rows))} launches without "
          f"a passing config")
    return 0


if __name__ == "__main__":
    sys.exit(main())
