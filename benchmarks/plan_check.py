"""The plan (`imagic.plan`) against measurement at SD1.5 size on the CPU.

For every stage: the planned peak (meta tensors, no weights) beside the peak measured on the real models with
benchmarks/imagic_step.py's accounting (bytes resident before the step + the highest net allocation
torch.profiler sees during it), measured again by a second, independent method (the plan's StorageTracker run on
the real tensors), and beside the process's resident memory (RSS, sampled every 2 ms during the step); planned
FLOPs beside FlopCounterMode's on the real run. Each measurement is the first step of fresh trainable state (the
warm-up step imagic_step.py measures), in one process, stage 1 first.

It also reproduces the 1.37 GiB a storage-tracking dispatch mode reported for one stage-1 step: the
same tracker without the resident tensors registered counts every weight that passes through an op as a view
(nn.Linear's weight.t() in aten.linear), as if the step had allocated it.

    python benchmarks/plan_check.py                     # SD1.5, 256x256, fp32: ~13 GB of RAM (full fine-tuning)
    python benchmarks/plan_check.py --small             # tiny widths: a smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import logging
import os
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from common import write_table
from imagic_step import Trainer, cpu_step_peak, full_finetuning, resident_bytes, sampling_step
from unet_step import model_config

from imagic import lora as L
from imagic.plan import plan
from imagic.plan_memory import StorageTracker
from imagic.plan_steps import flop_counter
from imagic.schedule import NoiseSchedule
from imagic.unet import UNetModel
from imagic.vae import AutoencoderKL, decode_latents, encode_latents

log = logging.getLogger("plan_check")
GIB = 2 ** 30
RECORDED = {"stage1": 3.56, "stage2 LoRA": 3.65, "stage2 full": 12.81, "sample": 3.33}  # imagic_step_cpu.md
Made = Tuple[Callable[[], object], Callable[[], List[Tensor]]]


class RssSampler:
    """Peak resident set size of this process while the block runs, read from /proc/self/statm."""

    def __init__(self, period: float = 0.002):
        self.period, self.peak, self._stop = period, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        thread = threading.Thread(target=self._run, daemon=True)
        self.peak = self.rss()
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()
            self.peak = max(self.peak, self.rss())


def measure(make: Callable[[], Made]) -> Dict[str, float]:
    """RSS growth of a plain run, the benchmark's accounting (profiler), the tracker on the real tensors and
    FlopCounterMode's FLOPs, each on freshly made state."""
    out: Dict[str, float] = {}
    step, _ = make()
    sampler = RssSampler()
    before = RssSampler.rss()
    with sampler.sampling():
        step()
    out["rss_growth"] = sampler.peak - before
    step, resident = make()
    resident_now = resident_bytes(resident())
    _, during = cpu_step_peak(step)
    out["resident"], out["profiler"] = resident_now, resident_now + during
    step, resident = make()
    tracker = StorageTracker("cpu")
    tracker.add_resident(resident(), "weights")
    with tracker:
        step()
    step, _ = make()
    flops = flop_counter()  # apart: it changes memory under gradient checkpointing (imagic/plan_steps.py)
    with flops:
        step()
    out["tracker"], out["flops"] = tracker.peak, flops.get_total_flops()
    return out


def malloc_trim() -> bool:
    """Ask glibc to hand the free memory of its heaps back to the system (what it keeps for reuse otherwise)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


def unregistered_stage1(unet: nn.Module, x0: Tensor, e: Tensor, schedule: NoiseSchedule) -> Tuple[int, int]:
    """(what a StorageTracker that was not told the resident tensors reports for one stage-1 step, bytes of the
    nn.Linear weights it then counts as allocated)."""
    emb = e.clone().requires_grad_(True)
    trainer = Trainer(unet, [emb], 2e-3, emb, x0, schedule, "fp32")
    tracker = StorageTracker("cpu")
    with tracker:
        trainer.step()
    linear = sum(m.weight.nbytes for m in unet.modules() if isinstance(m, nn.Linear))
    return tracker.peak, linear


@dataclasses.dataclass
class Models:
    unet: UNetModel
    vae: AutoencoderKL
    schedule: NoiseSchedule
    x0: Tensor
    e: Tensor
    uncond: Tensor
    image: Tensor


def stages(m: Models, lora_rank: int) -> Dict[str, Callable[[], Made]]:
    """One factory per stage, each making the step and its resident tensors afresh (as imagic_step.py does)."""
    def trainer(params: List[Tensor], context: Tensor, lr: float) -> Made:
        tr = Trainer(m.unet, params, lr, context, m.x0, m.schedule, "fp32")
        return tr.step, tr.resident

    def stage1() -> Made:
        emb = m.e.clone().requires_grad_(True)
        return trainer([emb], emb, 2e-3)

    def lora() -> Made:
        L.remove_lora(m.unet)  # the previous factory's adapters (fresh, zero-initialised ones each time)
        L.inject_lora(m.unet, rank=lora_rank)
        return trainer(L.lora_parameters(m.unet), m.e, 2e-4)

    def sample() -> Made:
        return (lambda: sampling_step(m.unet, torch.float32, "fp32", m.schedule, m.x0, m.e, m.uncond),
                lambda: [*m.unet.parameters(), *m.unet.buffers(), m.x0, m.e, m.uncond])

    def vae(encode: bool) -> Made:
        x = m.image if encode else m.x0

        def run() -> Tensor:
            with torch.no_grad():
                if encode:
                    return encode_latents(m.vae, x, 0.18215, sample=False)
                return decode_latents(m.vae, x, 0.18215)
        return run, lambda: [*m.vae.parameters(), *m.vae.buffers(), x]

    return {"stage1": stage1, "stage2 LoRA": lora, "sample": sample, "vae_encode": lambda: vae(True),
            "vae_decode": lambda: vae(False)}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--small", action="store_true", help="tiny widths, SD1 structure: a quick smoke run")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = model_config(args.small)
    latent = args.resolution // 8
    g = torch.Generator().manual_seed(0)
    m = Models(UNetModel(cfg.unet).requires_grad_(False), AutoencoderKL(cfg.vae).requires_grad_(False),
               NoiseSchedule.from_config(cfg), torch.randn(1, 4, latent, latent, generator=g),
               torch.randn(1, 77, cfg.unet.context_dim, generator=g),
               torch.randn(1, 77, cfg.unet.context_dim, generator=g),
               torch.randn(1, 3, args.resolution, args.resolution, generator=g))
    results: Dict[str, Dict[str, float]] = {}
    for name, make in stages(m, args.lora_rank).items():
        log.info("measuring %s", name)
        results[name] = measure(make)
        if name == "stage2 LoRA":
            L.remove_lora(m.unet)
    # Freed memory stays in glibc's heaps, so the process holds more than its tensors; hand it back before the
    # ~13 GB stage (without this the process was killed for memory here) and record both sides.
    rss_kept = RssSampler.rss()
    trimmed = malloc_trim()
    rss_trimmed = RssSampler.rss()
    tensors = resident_bytes([*m.unet.parameters(), *m.unet.buffers(), *m.vae.parameters(), *m.vae.buffers()])
    log.info("measuring stage2 full")
    with full_finetuning(m.unet) as params:
        def full() -> Made:
            m.unet.zero_grad(set_to_none=True)  # the previous run's gradients and Adam state go
            tr = Trainer(m.unet, params, 5e-7, m.e, m.x0, m.schedule, "fp32")
            return tr.step, tr.resident
        results["stage2 full"] = measure(full)
    log.info("the unregistered tracker")
    unregistered, linear = unregistered_stage1(m.unet, m.x0, m.e, m.schedule)
    del m
    log.info("planning")
    common = dict(device="cpu", precision="fp32", resolution=args.resolution, seeds=1, alphas=1,
                  lora_rank=args.lora_rank)
    lora_plan, full_plan = plan(cfg, finetune="lora", **common), plan(cfg, finetune="full", **common)
    planned = {"stage1": lora_plan.stages["stage1"], "stage2 LoRA": lora_plan.stages["stage2"],
               "stage2 full": full_plan.stages["stage2"], "sample": lora_plan.stages["sample"],
               "vae_encode": lora_plan.stages["vae_encode"], "vae_decode": lora_plan.stages["vae_decode"]}
    header = ["stage", "planned GiB", "measured GiB (profiler)", "plan / measured", "tracker on real tensors GiB",
              "imagic_step_cpu.md GiB", "RSS growth GiB", "planned GFLOP", "measured GFLOP"]
    rows = []
    for name in planned:
        r, p = results[name], planned[name]
        rows.append([name, f"{p.peak_bytes / GIB:.3f}", f"{r['profiler'] / GIB:.3f}",
                     f"{p.peak_bytes / r['profiler']:.3f}", f"{r['tracker'] / GIB:.3f}",
                     f"{RECORDED[name]:.2f}" if name in RECORDED and not args.small else "",
                     f"{r['rss_growth'] / GIB:.3f}", f"{p.flops / 1e9:,.1f}", f"{r['flops'] / 1e9:,.1f}"])
    s1 = results["stage1"]
    notes = [
        f"{'Tiny SD1-structured' if args.small else 'SD1.5'} UNet and VAE, random weights, {args.resolution}x"
        f"{args.resolution}, fp32, batch 1 (sampling: CFG batch 2), LoRA rank {args.lora_rank}; measured in one "
        "process in the order stage 1, LoRA, sample, VAE encode, VAE decode, stage 2 full. measured = bytes resident before the step + the highest net "
        "allocation torch.profiler records during it (benchmarks/imagic_step.py); tracker = imagic.plan_memory's "
        "StorageTracker on the real tensors, resident tensors registered; RSS growth = peak resident set during a "
        "plain run of the step (sampled every 2 ms) minus the resident set before it.",
        f"Stage 1 during the step: profiler {(s1['profiler'] - s1['resident']) / GIB:.3f} GiB, "
        f"RSS {s1['rss_growth'] / GIB:.3f} GiB; the StorageTracker without the resident tensors registered reports "
        f"{unregistered / GIB:.3f} GiB, of which {linear / GIB:.3f} GiB are the nn.Linear weights it meets as views "
        "(weight.t() inside aten.linear) and counts as allocated.",
        f"Before stage 2 full the process's RSS was {rss_kept / GIB:.2f} GiB for {tensors / GIB:.2f} GiB of live "
        f"tensors (the models); glibc's malloc_trim(0) {'returned' if trimmed else 'could not return'} the free "
        f"heap memory, leaving {rss_trimmed / GIB:.2f} GiB: freed tensors stay in the allocator's heaps, which is "
        "why RSS does not measure a step's tensors.",
    ]
    write_table("plan_check" + ("_small" if args.small else "") + "_cpu",
                f"Plan vs measurement ({'tiny' if args.small else 'SD1.5'}, {args.resolution}x{args.resolution}, "
                "fp32, cpu)", header, rows, notes)


if __name__ == "__main__":
    main()
