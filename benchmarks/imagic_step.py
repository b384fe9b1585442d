"""Imagic step speed and peak memory: ours (Triton kernels on / off) vs diffusers' UNet with SDPA.

One row per kind of step the editor runs, each the editor's own step function from `imagic.steps` (what its loops
call, with a seeded generator and the Adam of `imagic.steps.make_adam`; the learning rates of
`imagic.settings.FitSettings`), given our UNet or diffusers':

    stage 1 step       forward + backward to the text embedding (weights frozen) + Adam on the embedding
    stage 2 LoRA step  rank-4 LoRA (`imagic.lora.inject_lora`, kohya's targets) + Adam on the LoRA matrices;
                       diffusers side: the same targets through peft (`unet.add_adapter`), when peft is installed
    stage 2 full step  every UNet weight trainable (fp32 master weights, as the editor) + Adam
    sampling step      classifier-free guidance (one batch-2 forward, no grad) + the DDIM update

Precision as in the editor: frozen weights in `--dtype`, trainable tensors (embedding, LoRA, full weights) and
their Adam state in fp32, the forward under autocast. Both UNets hold the same weight tensors (see
benchmarks/unet_step.py `build_pair`). Variants run interleaved per row (ABBA), except the full fine-tuning
row, which runs one model at a time so that only one set of fp32 weights + Adam state is alive (memory).

Peak memory: CUDA `max_memory_allocated` over one step (reset just before it; weights and everything resident
included). CPU has no allocator statistics, so there it is the bytes of the tensors resident before the step
(weights, gradients, optimizer state, inputs) plus the highest net amount torch allocated during the (warm-up)
step, read from torch.profiler's allocation events.

    python benchmarks/imagic_step.py                                # CPU: SD1.5 UNet, fp32, 32x32 latents
    python benchmarks/imagic_step.py --device cuda --dtype bf16     # GPU: 512x512 (64x64 latents)
    python benchmarks/imagic_step.py --small --latent 16            # tiny widths: a smoke run
"""
from __future__ import annotations

import argparse
import itertools
import logging
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from common import write_table
from unet_step import DTYPES, DiffusersUNet, abba, build_pair, median, model_config, rel_err, result_name

from imagic import kernels
from imagic import lora as L
from imagic.plan_steps import SAMPLE_T, SAMPLE_T_PREV
from imagic.schedule import NoiseSchedule
from imagic.settings import FitSettings, SampleSettings
from imagic.steps import OnDevice, denoiser, guided_ddim_step, make_adam, stage1_step, stage2_step, trainable

log = logging.getLogger("imagic_step")
PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
GIB = 2 ** 30


# --- memory ---------------------------------------------------------------------------------------------------

def resident_bytes(tensors: Iterable[Optional[Tensor]]) -> int:
    """Bytes of the distinct storages behind `tensors` (shared weights counted once)."""
    seen: Dict[int, int] = {}
    for t in tensors:
        if t is not None:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def cpu_step_peak(fn: Callable[[], object]) -> Tuple[object, int]:
    """(fn(), the highest net number of bytes torch allocated on the CPU while fn ran), from the profiler's
    allocation events (private but stable API: torch/profiler/_memory_profiler.py reads the same tree)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    running = itertools.accumulate(size for _, size in sorted(events))
    return out, max(itertools.chain([0], running))


# --- the steps ------------------------------------------------------------------------------------------------

class Trainer:
    """One training stage's optimiser step, the one `imagic.training.run_loop` takes: `steps.stage1_step` when the
    embedding is the one parameter (and the context), else `steps.stage2_step`."""

    def __init__(self, unet: nn.Module, params: List[Tensor], lr: float, context: Tensor, x0: Tensor,
                 schedule: NoiseSchedule, precision: str, opt: Optional[torch.optim.Optimizer] = None):
        self.unet, self.params, self.context, self.x0 = unet, params, context, x0
        self.schedule, self.device = schedule, OnDevice(x0.device, precision)
        self.opt = opt if opt is not None else make_adam(params, lr)  # kernels on/off share ours'
        self.gen = torch.Generator().manual_seed(0)  # each variant draws the same t and noise

    def step(self) -> Tensor:
        """One step; returns the loss (before the update)."""
        if len(self.params) == 1 and self.params[0] is self.context:
            return stage1_step(self.unet, self.schedule, self.x0, self.context, self.opt, self.gen, self.device)
        return stage2_step(self.unet, self.schedule, self.x0, self.context, self.params, self.opt, self.gen,
                           self.device)

    def step_grad(self) -> Tensor:
        """One step; returns a copy of the first parameter's gradient (stage 1: the embedding's)."""
        self.step()
        return self.params[0].grad.clone()

    def resident(self) -> List[Optional[Tensor]]:
        """Tensors alive between steps: weights, buffers, trainable params, their grads, Adam state, inputs."""
        state = [v for s in self.opt.state.values() for v in s.values() if isinstance(v, Tensor)]
        return [*self.unet.parameters(), *self.unet.buffers(), *self.params, *(p.grad for p in self.params),
                *state, self.context, self.x0]


def sampling_step(unet: nn.Module, dtype: torch.dtype, precision: str, schedule: NoiseSchedule, x: Tensor,
                  context: Tensor, uncond: Tensor) -> Tensor:
    """One CFG + DDIM step as `Editor.sample_latents` takes it: `steps.guided_ddim_step` on `steps.denoiser`, with
    the default guidance scale."""
    s = SampleSettings()
    return guided_ddim_step(denoiser(unet, dtype), schedule, x, SAMPLE_T, SAMPLE_T_PREV, context, uncond,
                            s.guidance_scale, s.ddim_eta, OnDevice(x.device, precision)).prev_sample


# --- variants and rows ----------------------------------------------------------------------------------------

def with_kernels(fn: Callable[[], object], triton: Optional[bool]) -> Callable[[], object]:
    """fn run under `kernels.use_triton(triton)` (None: the automatic choice)."""
    def run() -> object:
        with kernels.use_triton(triton, strict=bool(triton)):
            return fn()
    return run


def ours_variants(device: torch.device) -> Dict[str, Optional[bool]]:
    """Our variants: Triton kernels forced on and off where that differs (CUDA with Triton), else the torch path."""
    if device.type == "cuda" and kernels.triton_available():
        return {"ours triton": True, "ours torch": False}
    return {"ours": False}


def measure_row(fns: Dict[str, Callable[[], object]], resident: Dict[str, Callable[[], int]], repeats: int,
                device: torch.device) -> Tuple[Dict[str, float], Dict[str, float], Dict[str, object]]:
    """(median seconds, peak GiB, warm-up result) per variant: a warm-up, a memory run, then timed ABBA runs.

    On the CPU the warm-up is the memory run (profiled: its overhead is not timed)."""
    warm: Dict[str, object] = {}
    peak: Dict[str, float] = {}
    for name, fn in fns.items():
        if device.type == "cuda":
            warm[name] = fn()
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            peak[name] = torch.cuda.max_memory_allocated(device) / GIB
        else:
            before = resident[name]()
            warm[name], during = cpu_step_peak(fn)
            peak[name] = (before + during) / GIB
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return {n: median(ts) for n, ts in abba(fns, repeats, sync).items()}, peak, warm


def peft_lora(theirs: DiffusersUNet, rank: int) -> Optional[List[nn.Parameter]]:
    """LoRA on diffusers' UNet through peft, on the modules our `inject_lora` wraps, trainable params in fp32
    (as diffusers' train_text_to_image_lora.py); None when peft is not installed."""
    try:
        from peft import LoraConfig
    except ImportError:
        return None
    from diffusers.training_utils import cast_training_params

    theirs.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=list(L.DEFAULT_TARGETS)))
    cast_training_params(theirs.unet, dtype=torch.float32)
    return [p for p in theirs.parameters() if p.requires_grad]


# --- main -----------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="precision of the frozen weights/autocast")
    p.add_argument("--latent", type=int, default=None,
                   help="latent size (pixels / 8); default 64 (512x512) on CUDA, 32 on the CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 5 on CUDA, 2 on CPU)")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--gradient-checkpointing", action="store_true", help="for both models, in the training rows")
    p.add_argument("--small", action="store_true", help="tiny widths, SD1 structure: a quick smoke run")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p.parse_args(argv)


class Bench:
    """The two models, the shared inputs, and the rows measured so far."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device, self.dtype = torch.device(args.device), DTYPES[args.dtype]
        self.precision = PRECISION_NAMES[self.dtype]
        self.latent = args.latent or (64 if self.device.type == "cuda" else 32)
        self.repeats = args.repeats or (5 if self.device.type == "cuda" else 2)
        self.cfg = model_config(args.small)
        self.ours, self.theirs = build_pair(self.cfg, self.device, self.dtype)
        if args.gradient_checkpointing:
            self.ours.set_gradient_checkpointing(True)
            self.theirs.unet.enable_gradient_checkpointing()
        self.schedule = NoiseSchedule.from_config(self.cfg)
        g = torch.Generator().manual_seed(0)
        shape = (1, self.cfg.unet.in_channels, self.latent, self.latent)
        emb = (1, self.cfg.text.context_length, self.cfg.unet.context_dim)
        self.x0 = torch.randn(shape, generator=g).to(self.device)
        self.e = torch.randn(emb, generator=g).to(self.device)
        self.uncond = torch.randn(emb, generator=g).to(self.device)
        self.variants = ours_variants(self.device)
        self.rows: Dict[str, list] = {}

    def models(self) -> Dict[str, nn.Module]:
        return {**{v: self.ours for v in self.variants}, "diffusers": self.theirs}

    def trainers(self, names: Sequence[str], params: List[Tensor], lr: float) -> Dict[str, Trainer]:
        """Stage-2 trainers (context: the embedding, frozen) for variants of ONE model, sharing an optimizer."""
        unet = self.models()[names[0]]
        first = Trainer(unet, params, lr, self.e, self.x0, self.schedule, self.precision)
        return {n: first if i == 0 else Trainer(unet, params, lr, self.e, self.x0, self.schedule, self.precision,
                                                opt=first.opt) for i, n in enumerate(names)}

    def run(self, row: str, trainers: Dict[str, Trainer], step: Callable[[Trainer], object],
            err: Callable[[object, object], float]) -> None:
        steps = {n: (lambda tr=tr: step(tr)) for n, tr in trainers.items()}
        resident = {n: (lambda tr=tr: resident_bytes(tr.resident())) for n, tr in trainers.items()}
        self.record(row, measure_row(self.fns(steps), resident, self.repeats, self.device), err)

    def fns(self, steps: Dict[str, Callable[[], object]]) -> Dict[str, Callable[[], object]]:
        """Wrap our variants' step functions in their kernel setting."""
        return {n: with_kernels(fn, self.variants.get(n)) for n, fn in steps.items()}

    def record(self, row: str, measured: Tuple[Dict[str, float], Dict[str, float], Dict[str, object]],
               err: Callable[[object, object], float]) -> None:
        """Store a row; the sanity error compares the warm-up (first) step of our first variant with diffusers'.
        (Later variants of ours start from state the first one changed: LoRA matrices, Adam moments.)"""
        secs, peak, warm = measured
        first = next(iter(self.variants))
        self.rows[row] = [secs, peak, f"{err(warm[first], warm['diffusers']):.1e}" if "diffusers" in warm else "n/a"]

    def stage1(self) -> None:
        lr = FitSettings().embed_lr
        trainers = {}
        for name, model in self.models().items():
            e = self.e.clone().requires_grad_(True)  # the embedding is the trainable parameter and the context
            trainers[name] = Trainer(model, [e], lr, e, self.x0, self.schedule, self.precision)
        self.run("stage 1 step", trainers, Trainer.step_grad, rel_err)

    def sampling(self) -> None:
        steps = {n: (lambda m=m: sampling_step(m, self.dtype, self.precision, self.schedule, self.x0, self.e,
                                                self.uncond)) for n, m in self.models().items()}
        inputs = [self.x0, self.e, self.uncond]
        resident = {n: (lambda m=m: resident_bytes([*m.parameters(), *m.buffers(), *inputs]))
                    for n, m in self.models().items()}
        self.record("sampling step (CFG)", measure_row(self.fns(steps), resident, self.repeats, self.device),
                    rel_err)

    def full(self) -> None:
        """One model at a time, each made trainable as the editor does (`steps.trainable`: fp32 master weights,
        the base weights restored afterwards), so that only one set of gradients + Adam state is alive. No sanity
        error here: our variants share one optimizer, whose steps move the weights between them."""
        lr = FitSettings(finetune="full").resolved().finetune_lr
        secs: Dict[str, float] = {}
        peak: Dict[str, float] = {}
        for group in (list(self.variants), ["diffusers"]):
            with trainable(self.models()[group[0]], FitSettings(finetune="full")) as params:
                trainers = self.trainers(group, params, lr)
                steps = {n: tr.step for n, tr in trainers.items()}
                resident = {n: (lambda tr=tr: resident_bytes(tr.resident())) for n, tr in trainers.items()}
                s, p, _ = measure_row(self.fns(steps), resident, self.repeats, self.device)
                del trainers, steps, resident
            secs.update(s)
            peak.update(p)
        self.rows["stage 2 full step"] = [secs, peak, "n/a"]

    def lora(self) -> None:
        """Last: peft's adapter stays on diffusers' UNet."""
        s = FitSettings(finetune="lora", lora_rank=self.args.lora_rank).resolved()
        with trainable(self.ours, s) as params:
            trainers = self.trainers(list(self.variants), params, s.finetune_lr)
            theirs = peft_lora(self.theirs, self.args.lora_rank)
            if theirs is not None:
                trainers.update(self.trainers(["diffusers"], theirs, s.finetune_lr))
            self.run("stage 2 LoRA step", trainers, Trainer.step, loss_rel_diff)

    def table(self) -> Tuple[List[str], List[list]]:
        names = [*self.variants, "diffusers"]
        on_off = list(self.variants) if len(self.variants) == 2 else []  # ours triton, ours torch (CUDA only)
        kernels_ratio = [f"{on_off[1]}/{on_off[0]}"] if on_off else []  # what the Triton kernels bring
        header = (["step"] + [f"{n} s" for n in names] + [f"diffusers/{v}" for v in self.variants] + kernels_ratio
                  + [f"{n} peak GiB" for n in names] + ["max rel err"])
        missing = "n/a (peft not installed)"
        rows = []
        for row in ("stage 1 step", "stage 2 LoRA step", "stage 2 full step", "sampling step (CFG)"):
            secs, peak, err = self.rows[row]
            cells = [row] + [f"{secs[n]:.3f}" if n in secs else missing for n in names]
            cells += [f"{secs['diffusers'] / secs[v]:.2f}" if "diffusers" in secs else "n/a" for v in self.variants]
            cells += [f"{secs[on_off[1]] / secs[on_off[0]]:.2f}"] if on_off else []
            cells += [f"{peak[n]:.2f}" if n in peak else "n/a" for n in names]
            rows.append(cells + [err])
        return header, rows


def loss_rel_diff(ours: Tensor, theirs: Tensor) -> float:
    """|loss_ours - loss_diffusers| / loss_diffusers of the first (warm-up) step."""
    return (abs(float(ours) - float(theirs)) / abs(float(theirs))) if float(theirs) else float("inf")


def notes(b: Bench) -> List[str]:
    on_cpu = b.device.type != "cuda"
    memory = ("CUDA max_memory_allocated over one step after a warm-up (everything resident on the GPU)"
              if not on_cpu else
              "bytes of tensors resident before the step (weights, grads, Adam state, inputs) + the highest net "
              "amount torch allocated during the step (torch.profiler allocation events); shared weights counted "
              "once")
    out = [f"Seconds per step: median of {b.repeats} runs after a warm-up; variants interleaved (ABBA) except in "
           "the full fine-tuning row (one model at a time: memory). diffusers/X > 1 means X is faster.",
           f"Latents {b.latent}x{b.latent} (= {8 * b.latent}x{8 * b.latent} pixels), batch 1 (CFG: 2); frozen "
           f"weights {b.precision}, trainable tensors and Adam state fp32, autocast {b.precision}. Learning rates "
           f"of FitSettings: embedding {FitSettings().embed_lr:g}, LoRA "
           f"{FitSettings(finetune='lora').resolved().finetune_lr:g} (rank {b.args.lora_rank}, kohya targets: "
           f"{', '.join(L.DEFAULT_TARGETS)}), full {FitSettings(finetune='full').resolved().finetune_lr:g}.",
           f"Peak memory: {memory}.",
           f"max rel err (sanity, {next(iter(b.variants))} vs diffusers on the warm-up step): stage 1: gradient "
           "w.r.t. the embedding, max |diff| / std; LoRA: |loss difference| / loss of the first step (same t and "
           "noise; LoRA up matrices start at zero on both sides); full: n/a (the models share weight tensors, "
           "which the first model's Adam steps moved; the all-weight backward is checked by unet_step.py); "
           "sampling: the DDIM update's output, max |diff| / std.",
           "diffusers: UNet2DConditionModel, AttnProcessor2_0 (torch SDPA), same weight tensors; LoRA via peft "
           "(`add_adapter`, trainable params cast to fp32)."]
    if on_cpu:
        out.append("On the CPU `imagic.kernels.use_triton(True)` and `(False)` both run the torch path (Triton "
                   "kernels need CUDA), so ours is measured once: the kernels-on/off comparison is GPU-only.")
    if b.precision != "fp32":
        out.append(f"In {b.precision} the sanity errors are rounding (ours keeps norm statistics in fp32, diffusers "
                   "in the autocast dtype); fp32 runs are the parity check.")
    if b.args.gradient_checkpointing:
        out.append("Gradient checkpointing on in both models.")
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    b = Bench(args)
    for stage in (b.stage1, b.sampling, b.full, b.lora):  # LoRA last: peft's adapter is not removed
        log.info("%s", stage.__name__)
        stage()
    header, rows = b.table()
    n_params = sum(p.numel() for p in b.ours.parameters())
    size = "tiny SD1-structured" if args.small else "SD1.5"
    write_table(result_name("imagic_step", b.device, args.dtype, args.small,
                            "ckpt" if args.gradient_checkpointing else ""),
                f"Imagic steps: ours vs diffusers ({size} UNet, {n_params / 1e6:.1f}M parameters, {b.precision}, "
                f"{8 * b.latent}x{8 * b.latent}, {b.device.type})", header, rows, notes(b))


if __name__ == "__main__":
    main()
