"""Know before you run: the memory and compute of every stage of an edit, from the real code on `meta` tensors.

    p = plan("sd1", device="cuda", precision="bf16", finetune="lora", seeds=2, alphas=[0.9, 1.0])
    p.stages["stage1"].peak_bytes, p.stages["stage2"].flops, p.time_floor("A100"), p.within(8)
    print(p.table())

For each stage (`plan_steps`: stage1, stage2, sample, vae_encode, vae_decode) the models are built on the `meta`
device from a config (no weights are read), the stage's step runs as benchmarks/imagic_step.py runs it, and a
storage-tracking dispatch mode (`plan_memory.StorageTracker`) counts the bytes alive after every op while
FlopCounterMode's table counts the FLOPs (`plan_steps.FlopCount`). The peak splits into frozen weights, trainable tensors with their gradients
and Adam state, and activations/workspace. `held` adds what the Editor keeps on the device meanwhile: the models
the stage does not run (the text encoder and VAE during UNet stages, the UNet and text encoder during VAE stages)
and the copies it takes to restore the base UNet afterwards (`fitting.trainable` clones the whole UNet for full
fine-tuning, `fitting.finetuned_weights` clones it for full samples and keeps the pre-merge LoRA-targeted weights
for LoRA samples); `offload=True` plans without them, for an editor that keeps only what each stage runs.
Every family takes the same path, decided by the config: with a second text tower (`text2`, SDXL) the text
encoder is both towers and the embedding is the packed (1, 78, width) one; a vector-conditioned UNet
(`unet.num_classes`) is called through `sdxl.VectorUNet` with its `y` (`plan_steps`).
On CUDA attention is our Triton flash kernel (it saves q, k, v, the output and the row logsumexp, never the Lq x Lk
scores), counted by running under `kernels.launch.recording` for an sm_80 GPU, where the kernels allocate what
they allocate on a GPU and record their launches instead of running; on the CPU it is the CPU SDPA kernel.

Checked against measurement (tests/test_plan.py on small models; benchmarks/plan_check.py at SD1.5 size, table in
benchmarks/results/plan_check_cpu.md): on the CPU the plan's peak is the accounting of benchmarks/imagic_step.py,
bytes resident before the step plus the highest net allocation torch.profiler sees during it; at SD1.5 256² fp32
the two agree to 0.1% for the UNet stages (sampling 1.8% and the VAE 6% under it: workspace the convolutions
allocate and free inside one op, which no tensor holds).

Which measurement is right. Three once disagreed on one SD1.5 256² fp32 stage-1 step: the profiler said
0.36 GiB during the step, resident memory (RSS) grew 0.5-0.6 GiB, a storage-tracking dispatch mode said 1.37 GiB.
The profiler is right, and an independent method agrees: StorageTracker run on the real tensors gives 0.361 GiB,
as does the plan. The 1.37 GiB is that tracker without the tensors resident before the step registered:
nn.Linear's weight reaches the ops as a view (weight.t() inside aten.linear), so each weight's storage looks
newly allocated and never dies; 1.006 GiB of Linear weights + 0.361 = 1.367 GiB, reproduced in plan_check.py.
RSS counts pages, not tensors: glibc keeps freed chunks in its heaps for reuse (before the full fine-tuning row
the process held 5.02 GiB for 3.51 GiB of live tensors, and malloc_trim(0) gave 0.78 GiB back), and the first
step also touches memory no tensor holds (autograd's graph, oneDNN's caches, code pages), so RSS grew 0.59 GiB
for 0.36 GiB of tensors. (FlopCounterMode is kept apart from memory measurements: under gradient checkpointing it
keeps recomputed tensors alive, see `plan_steps`.)
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple, Union

from . import lora as L
from .config import ModelConfig, preset
from .kernels import triton_available
from .gpus import CARDS_GB, CUDA_RESERVE_BYTES, GIB, GPUS
from .plan_steps import Counted, count, meta_text, meta_unet, meta_vae, model_bytes, sample, stage1, stage2, \
    vae_decode, vae_encode
from .settings import FitSettings, RuntimeSettings, SampleSettings

STAGES = ("stage1", "stage2", "sample", "vae_encode", "vae_decode")


@dataclasses.dataclass
class StagePlan:
    """One stage: its peak split in three, what the editor holds beside it, and the FLOPs of one step."""
    weights_bytes: int
    trainable_bytes: int
    activations_bytes: int
    held_bytes: int
    flops: int
    steps: int
    precision: str  # what its matmuls run in (the VAE is fp32 whatever the edit's precision)

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.trainable_bytes + self.activations_bytes

    @property
    def device_bytes(self) -> int:
        return self.peak_bytes + self.held_bytes

    @property
    def edit_flops(self) -> int:
        return self.flops * self.steps

    def to_dict(self) -> Dict[str, Union[int, str]]:
        return {"peak_bytes": self.peak_bytes, "weights_bytes": self.weights_bytes,
                "trainable_bytes": self.trainable_bytes, "activations_bytes": self.activations_bytes,
                "held_bytes": self.held_bytes, "device_bytes": self.device_bytes, "flops": self.flops,
                "steps": self.steps, "edit_flops": self.edit_flops, "precision": self.precision}


@dataclasses.dataclass
class Plan:
    settings: Dict[str, object]
    stages: Dict[str, StagePlan]
    reserve_bytes: int = CUDA_RESERVE_BYTES

    @property
    def device_bytes(self) -> int:
        """The most any stage needs on the device (its peak plus what the editor holds beside it)."""
        return max(s.device_bytes for s in self.stages.values())

    @property
    def edit_flops(self) -> int:
        return sum(s.edit_flops for s in self.stages.values())

    def time_floor(self, gpu: str) -> Optional[float]:
        """Seconds the whole edit takes at least on `gpu` (a name in gpus.GPUS) at its dense peak, each stage in
        its precision; None where the GPU has no tensor cores for it (bf16 on a T4)."""
        card = next(g for g in GPUS if g.name == gpu)
        total = 0.0
        for s in self.stages.values():
            peak = card.peak_tflops(s.precision)
            if peak is None:
                return None
            total += s.edit_flops / (peak * 1e12)
        return total

    def within(self, card_gb: int) -> bool:
        """Whether every stage fits a card of `card_gb` GB (GiB, as cards are sold) beside the CUDA reserve."""
        return self.device_bytes + self.reserve_bytes <= card_gb * GIB

    def to_dict(self) -> Dict[str, object]:
        return {"settings": self.settings, "stages": {n: s.to_dict() for n, s in self.stages.items()},
                "device_bytes": self.device_bytes, "edit_flops": self.edit_flops,
                "reserve_bytes": self.reserve_bytes,
                "time_floor_s": {g.name: self.time_floor(g.name) for g in GPUS},
                "fits_gb": {str(c): self.within(c) for c in CARDS_GB}}

    def table(self) -> str:
        return format_plan(self)


def _count_of(items: Union[int, Sequence[object]], name: str) -> int:
    n = items if isinstance(items, int) else len(items)
    if n < 1:
        raise ValueError(f"{name}: at least one, got {items!r}")
    return n


def _check_size(cfg: ModelConfig, device: str, resolution: int) -> None:
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device!r}")
    multiple = cfg.vae.downsample_factor * 2 ** (len(cfg.unet.channel_mult) - 1)
    if resolution < multiple or resolution % multiple:
        raise ValueError(f"resolution must be a positive multiple of {multiple} for this model, got {resolution}")


def plan(model: Union[str, ModelConfig], device: str = "cuda", precision: str = RuntimeSettings.precision,
         finetune: str = FitSettings.finetune, lora_rank: int = FitSettings.lora_rank,
         resolution: Optional[int] = None, gradient_checkpointing: bool = RuntimeSettings.gradient_checkpointing,
         seeds: Union[int, Sequence[int]] = SampleSettings.seeds,
         alphas: Union[int, Sequence[float]] = SampleSettings.alpha, embed_steps: int = FitSettings.embed_steps,
         finetune_steps: Optional[int] = None, ddim_steps: int = SampleSettings.steps,
         kernels: str = RuntimeSettings.kernels, offload: bool = False, reserve_bytes: int = CUDA_RESERVE_BYTES,
         sample_batch: int = 1) -> Plan:
    """The plan of an edit of `model` (a family preset name: "sd1", "sd2", "sd2-v", "sdxl", or a ModelConfig).

    device: "cuda" or "cpu", where the edit would run. resolution: pixels (default: the model's native size);
    seeds, alphas: counts or lists, the edit samples their product of images, `sample_batch` per UNet call (the
    Editor's is 1: it runs each seed's DDIM loop alone, and decodes one latent at a time), its CFG batch twice that.
    The other settings, their defaults and their checks are the editor's (`imagic.settings`); finetune_steps None
    is the mode's default. kernels: "auto" (our Triton kernels on CUDA when Triton is installed here), "triton" or
    "torch". See the module docstring for the rest.
    """
    cfg = model if isinstance(model, ModelConfig) else preset(model)
    fit = FitSettings(finetune=finetune, lora_rank=lora_rank, embed_steps=embed_steps,
                      finetune_steps=finetune_steps).resolved()
    RuntimeSettings(precision=precision, kernels=kernels, resolution=resolution)  # checked as the editor's are
    ddim_steps = SampleSettings(steps=ddim_steps).steps
    resolution = resolution or cfg.image_size
    _check_size(cfg, device, resolution)
    images = _count_of(seeds, "seeds") * _count_of(alphas, "alphas")
    batch = min(_count_of(sample_batch, "sample_batch"), images)
    triton = device == "cuda" and (kernels == "triton" or (kernels == "auto" and triton_available()))
    steps = {"stage1": fit.embed_steps, "stage2": fit.finetune_steps,
             "sample": ddim_steps * -(-images // batch), "vae_encode": 1,
             "vae_decode": images}
    latent = resolution // cfg.vae.downsample_factor

    unet = meta_unet(cfg, precision, gradient_checkpointing)
    vae = meta_vae(cfg)
    text = meta_text(cfg, precision)  # SDXL: both towers (sdxl.Conditioner)
    unet_bytes, vae_bytes, text_bytes = model_bytes(unet), model_bytes(vae), model_bytes(text)
    counted: Dict[str, Counted] = {"stage1": count(stage1(unet, cfg, latent), device, precision, triton)}
    counted["sample"] = count(sample(unet, cfg, latent, batch), device, precision, triton)
    vae_precision = "fp32"
    counted["vae_encode"] = count(vae_encode(vae, cfg, resolution), device, vae_precision, triton)
    counted["vae_decode"] = count(vae_decode(vae, cfg, latent), device, vae_precision, triton)
    L.inject_lora(unet, rank=lora_rank)  # what a LoRA edit merges for sampling: the targeted base weights
    merge_copies = sum(m.weight.nbytes for _, m in L.lora_modules(unet))
    L.remove_lora(unet)
    with stage2(unet, cfg, latent, finetune, lora_rank) as step:
        counted["stage2"] = count(step, device, precision, triton)

    restore = merge_copies if finetune == "lora" else unet_bytes  # Editor copies while sampling / decoding
    held = {"stage1": text_bytes + vae_bytes,
            "stage2": text_bytes + vae_bytes + (unet_bytes if finetune == "full" else 0),
            "sample": text_bytes + vae_bytes + restore,
            "vae_encode": unet_bytes + text_bytes,
            "vae_decode": unet_bytes + text_bytes + restore}
    stages = {name: StagePlan(weights_bytes=counted[name].parts["weights"],
                              trainable_bytes=counted[name].parts["trainable"],
                              activations_bytes=counted[name].parts["activations"],
                              held_bytes=0 if offload else held[name], flops=counted[name].flops,
                              steps=steps[name], precision=vae_precision if name.startswith("vae") else precision)
              for name in STAGES}
    settings: Dict[str, object] = {
        "family": cfg.family, "resolution": resolution, "device": device, "precision": precision,
        "finetune": finetune, "lora_rank": lora_rank, "gradient_checkpointing": gradient_checkpointing,
        "images": images, "sample_batch": batch, "kernels": "triton" if triton else "torch", "offload": offload,
        "model_bytes": {"unet": unet_bytes, "vae": vae_bytes, "text_encoder": text_bytes}}
    return Plan(settings, stages, reserve_bytes)


# --- the table ----------------------------------------------------------------------------------------------------

def _unit(p: Plan) -> Tuple[str, int]:
    """GiB for SD-sized plans, MiB for small models (so their numbers are not all 0.00)."""
    return ("GiB", GIB) if p.device_bytes >= GIB else ("MiB", 2 ** 20)


def _number(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f} ms"
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """Left-aligned first column, right-aligned numbers."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [line(header), *[line(r) for r in rows]]


def format_plan(p: Plan) -> str:
    """The readable table `imagic plan` prints."""
    s = p.settings
    finetune = f"LoRA rank {s['lora_rank']}" if s["finetune"] == "lora" else "full fine-tuning"
    lines = [f"imagic plan: {s['family']} at {s['resolution']}x{s['resolution']}, {s['device']} {s['precision']}, "
             f"{finetune}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
             f"{s['kernels']} kernels, {s['images']} images sampled {s['sample_batch']} at a time (x2 for guidance)"
             + (", models a stage does not run off the device" if s["offload"] else ""), ""]
    unit, size = _unit(p)
    b = lambda n: f"{n / size:.2f}"  # noqa: E731
    header = ["stage", "weights", "trainable", "activations", "peak", "held", "on device", "GFLOP/step", "steps",
              "TFLOP"]
    rows = [[name, b(st.weights_bytes), b(st.trainable_bytes), b(st.activations_bytes), b(st.peak_bytes),
             b(st.held_bytes), b(st.device_bytes), _number(st.flops / 1e9), str(st.steps),
             _number(st.edit_flops / 1e12)] for name, st in p.stages.items()]
    lines += _grid(header, rows)
    lines += ["", f"{unit}. trainable: trainable tensors + gradients + Adam state; held: models the stage does not "
              "run and restore copies the editor keeps on the device meanwhile.",
              f"Whole edit: {_number(p.edit_flops / 1e12)} TFLOP; at most {b(p.device_bytes)} {unit} on the device."]
    floors = []
    for g in GPUS:
        t = p.time_floor(g.name)
        floors.append(f"{g.name} {_seconds(t)}" if t is not None else f"{g.name} n/a")
    lines.append("Compute-bound time floor (dense tensor-core peak, fp32 at TF32): " + ", ".join(floors) + ".")
    fits = ", ".join(f"{c} GB {'yes' if p.within(c) else 'no'}" for c in CARDS_GB)
    lines.append(f"Fits (with {p.reserve_bytes / GIB:.2f} GiB for the CUDA context): {fits}.")
    return "\n".join(lines)
