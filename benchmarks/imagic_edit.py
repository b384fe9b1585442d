"""One whole Imagic edit at the paper's settings: ours (Triton kernels on / off) vs the diffusers community Imagic
pipeline, wall time and peak memory per stage.

What is timed is what a user runs, from the image and the prompt to the decoded samples:

    ours        `imagic.Editor.fit(image, prompt, finetune="lora" | "full", ...)`, then
                `Editor.sample(run, alpha=ALPHAS, seeds=SEEDS, ...)`, under `imagic.kernels.use_triton(True,
                strict=True)` ("ours triton", CUDA) and `use_triton(False)` ("ours torch")
    community   diffusers' `examples/community/imagic_stable_diffusion.py`: `train()` (embedding, then full
                fine-tuning: it has no LoRA mode, so compare it with our full rows), then one `__call__` per alpha
                and seed

Paper settings (the defaults): stage 1, 1000 Adam steps on the embedding at lr 2e-3; stage 2, LoRA rank 4 for 500
steps at 2e-4 or the full UNet for 1500 steps at 5e-7 (`imagic.settings.FitSettings`; the community pipeline gets
the same counts and learning rates); stage 3, 5 alphas x 2 seeds, 50 DDIM steps, guidance 7.5; 512x512.

All three run on the same random SD1.5-size weights (seeded, drawn on the CPU, rounded to bf16), written once into
a cache folder as a single-file checkpoint that our loader reads and, converted by diffusers' own single-file code,
as a diffusers pipeline folder (tokenizer files written from open_clip's bundled CLIP vocabulary; no downloads).

The community file is not in the diffusers wheel; get it from a diffusers checkout (not committed here: it is
diffusers' code) and pass `--community-file` (default `.whl/imagic_stable_diffusion.py`, which gpu.sh carries):
    git -C <diffusers> show HEAD:examples/community/imagic_stable_diffusion.py > .whl/imagic_stable_diffusion.py

    python benchmarks/imagic_edit.py --device cuda                        # paper settings -> imagic_edit_cuda_bf16.md
    python benchmarks/imagic_edit.py --device cuda --embed-steps 200 --finetune-steps 200 --steps 25   # + estimates
    python benchmarks/imagic_edit.py --device cpu --small --resolution 64 --embed-steps 2 --finetune-steps 2 --steps 2
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import importlib.util
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from common import write_table
from unet_step import SMALL_UNET, randomize_fast_, result_name

from imagic import kernels
from imagic.config import ModelConfig, TextConfig, VAEConfig, preset, to_ldm_yaml
from imagic.editor import Editor
from imagic.export import save_checkpoint
from imagic.fileio import load_safetensors
from imagic.settings import FitSettings, SampleSettings
from imagic.steps import OnDevice

if TYPE_CHECKING:  # for annotations only: diffusers and transformers are imported where the community parts run
    from diffusers import DiffusionPipeline
    from transformers import CLIPTokenizer

log = logging.getLogger("imagic_edit")
PROMPT = "a photo of a sitting dog"
ALPHAS = SampleSettings.alpha  # the Editor's defaults
SEEDS = (0, 1)
GUIDANCE = SampleSettings.guidance_scale
STAGES = ("stage 1", "stage 2", "stage 3")
MODES = ("lora", "full")
ROWS = [("ours triton", "lora"), ("ours triton", "full"), ("ours torch", "lora"), ("ours torch", "full"),
        ("community", "full")]
GIB = 2 ** 30
DEFAULT_COMMUNITY_FILE = Path(".whl/imagic_stable_diffusion.py")
# SD's 8x latent downsampling needs 4 VAE levels (the community pipeline hard-codes height // 8); widths of 32
# because the VAE's GroupNorm has 32 groups.
SMALL_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
SMALL_TEXT = TextConfig(width=SMALL_UNET.context_dim, layers=2, heads=2, mlp_width=128, projection_dim=64)
WEIGHTS_RECIPE = 1  # part of the cache key: bump when the way the weights are drawn changes


@dataclasses.dataclass(frozen=True)
class Steps:
    embed: int
    lora: int
    full: int
    ddim: int

    def finetune(self, mode: str) -> int:
        return self.lora if mode == "lora" else self.full


# The paper's settings are the Editor's defaults (FitSettings fills in the fine-tuning steps and lr per mode).
_LORA, _FULL = FitSettings(finetune="lora").resolved(), FitSettings(finetune="full").resolved()
PAPER = Steps(embed=_LORA.embed_steps, lora=int(_LORA.finetune_steps or 0), full=int(_FULL.finetune_steps or 0),
              ddim=SampleSettings.steps)
EMBED_LR, FULL_LR = _FULL.embed_lr, float(_FULL.finetune_lr or 0.0)
WARMUP = Steps(embed=1, lora=1, full=1, ddim=2)


def model_config(small: bool, resolution: int) -> ModelConfig:
    """SD1.5 (preset "sd1"), or its structure at tiny widths, sampled at `resolution` pixels."""
    cfg = preset("sd1")
    if small:
        cfg = dataclasses.replace(cfg, unet=SMALL_UNET, vae=SMALL_VAE, text=SMALL_TEXT)
    return dataclasses.replace(cfg, image_size=resolution)


# --- the shared weights ---------------------------------------------------------------------------------------

def shared_weights(cfg: ModelConfig, cache: Path, seed: int) -> Path:
    """The folder of the random weights for this model size and seed: `model.safetensors` (+ `.yaml`) for our
    loader, and `diffusers/` (see `diffusers_folder`). Built once: at SD1.5 size that takes a minute and GBs of
    disk, which a rerun on the same machine should not pay again."""
    sizes = json.dumps([dataclasses.asdict(p) for p in (cfg.unet, cfg.vae, cfg.text)], sort_keys=True)
    key = hashlib.sha256(f"{sizes} seed {seed} recipe {WEIGHTS_RECIPE}".encode()).hexdigest()[:12]
    root = cache / f"weights-{key}"
    done = root / "model.done"  # written last: a build cut short is redone
    if done.exists():
        log.info("reusing the weights in %s", root)
        return root
    log.info("drawing random weights into %s", root)
    root.mkdir(parents=True, exist_ok=True)
    save_checkpoint(root / "model.safetensors", *random_models(cfg, seed), cfg, dtype=torch.bfloat16)
    done.write_text("")
    return root


def diffusers_folder(root: Path, cfg: ModelConfig) -> Path:
    """`root`'s checkpoint as a diffusers pipeline folder (built once, only when the community pipeline runs)."""
    folder, done = root / "diffusers", root / "diffusers.done"
    if not done.exists():
        write_diffusers_folder(load_safetensors(root / "model.safetensors")[0], cfg, folder)
        done.write_text("")
    return folder


def random_models(cfg: ModelConfig, seed: int) -> Tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """UNet, VAE and text encoder with seeded random weights. The UNet (860M parameters, no buffers) is built on
    `meta` to skip a slow default init; the others are built normally, for their derived buffers."""
    from imagic.clip import build_text_encoder
    from imagic.unet import UNetModel
    from imagic.vae import AutoencoderKL

    with torch.device("meta"):
        unet = UNetModel(cfg.unet)
    unet.to_empty(device="cpu")
    return (randomize_fast_(unet, seed), randomize_fast_(AutoencoderKL(cfg.vae), seed + 1),
            randomize_fast_(build_text_encoder(cfg.text), seed + 2))


def write_diffusers_folder(ckpt: Dict[str, torch.Tensor], cfg: ModelConfig, folder: Path) -> None:
    """`ckpt` (LDM names) converted by diffusers' single-file code, as tests/test_diffusers_format.py does, into a
    StableDiffusionPipeline folder with SD's DDIM scheduler (the original `steps_offset=1` convention)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm, create_vae_diffusers_config_from_ldm)
    from transformers import CLIPTextConfig, CLIPTextModel

    yaml = to_ldm_yaml(cfg)
    unet_cfg = {**create_unet_diffusers_config_from_ldm(yaml, ckpt), "sample_size": cfg.latent_size}
    with torch.device("meta"):  # 860M parameters: skip the default init, the checkpoint's tensors are assigned
        unet = UNet2DConditionModel(**unet_cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, unet_cfg), strict=True, assign=True)
    vae_cfg = {**create_vae_diffusers_config_from_ldm(yaml, ckpt), "sample_size": cfg.image_size}
    vae = AutoencoderKL(**vae_cfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vae_cfg), strict=True)
    t = cfg.text
    text = CLIPTextModel(CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_width,
                                        num_hidden_layers=t.layers, num_attention_heads=t.heads,
                                        max_position_embeddings=t.context_length, hidden_act=t.act,
                                        layer_norm_eps=1e-5, projection_dim=t.projection_dim))
    text.load_state_dict({k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ckpt).items()},
                         strict=True)
    scheduler = DDIMScheduler(beta_start=cfg.linear_start, beta_end=cfg.linear_end, beta_schedule="scaled_linear",
                              num_train_timesteps=cfg.timesteps, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(folder.parent / "bpe"), unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)


def clip_tokenizer(directory: Path) -> "CLIPTokenizer":
    """transformers' CLIPTokenizer on CLIP's BPE files, written from the vocabulary open_clip ships (SD1 pads with
    the end-of-text token)."""
    from transformers import CLIPTokenizer

    from imagic.tokenizer import load_bpe

    encoder, ranks = load_bpe()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(encoder))
    merges = sorted(ranks, key=ranks.get)
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=77)


def input_image(size: int) -> Image.Image:
    """A fixed image: smooth colour gradients plus seeded noise (random weights make the content irrelevant)."""
    ramp = np.linspace(0, 255, size)
    rgb = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, ramp[::-1]) / 2,
                    np.broadcast_to(ramp, (size, size))], axis=-1)
    noise = np.random.default_rng(0).normal(0, 20, rgb.shape)
    return Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8))


# --- timing ---------------------------------------------------------------------------------------------------

class StageClock:
    """Wall time and peak memory of consecutive stages. `lap` ends a stage (after a device sync, so the GPU's
    queued work counts where it ran) and starts the next; the CUDA peak counter is reset at each lap, so each
    stage's peak is its own (everything resident on the GPU at the time included)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: Dict[str, float] = {}
        self.peak_gib: Dict[str, float] = {}
        self.t0 = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()

    def lap(self, stage: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.seconds[stage] = now - self.t0
        if self.device.type == "cuda":
            self.peak_gib[stage] = torch.cuda.max_memory_allocated(self.device) / GIB
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = now

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


# --- ours -----------------------------------------------------------------------------------------------------

def ours_variants(device: torch.device) -> Dict[str, bool]:
    """Our kernel settings to time: Triton forced on and off on CUDA, the torch path alone elsewhere (Triton
    kernels need CUDA; the CPU interpreter took over 15 minutes for the 2-step smoke edit)."""
    if device.type == "cuda" and kernels.triton_available():
        return {"ours triton": True, "ours torch": False}
    return {"ours torch": False}


def ours_edit(editor: Editor, image: Image.Image, mode: str, steps: Steps, triton: bool) -> StageClock:
    """fit + sample as a user calls them; stage 1 ends at the last embedding step (the Editor's step callback)."""
    clock = StageClock(editor.device)

    def end_of_stage1(stage: str, step: int, loss: float) -> None:
        if stage.startswith("stage 1") and step == steps.embed:
            clock.lap("stage 1")

    with kernels.use_triton(triton, strict=triton):
        clock.start()
        run = editor.fit(image, PROMPT, finetune=mode, embed_steps=steps.embed, finetune_steps=steps.finetune(mode),
                         callback=end_of_stage1)
        clock.lap("stage 2")
        editor.sample(run, alpha=list(ALPHAS), seeds=list(SEEDS), guidance_scale=GUIDANCE, steps=steps.ddim)
        clock.lap("stage 3")
    return clock


def run_ours(checkpoint: Path, cfg: ModelConfig, device: torch.device, precision: str, image: Image.Image,
             steps: Steps, triton: bool, warmup: bool) -> Tuple[Dict[str, StageClock], Optional[float]]:
    """{mode: clock} for a LoRA and a full edit on a freshly loaded Editor, and the warm-up seconds (with `warmup`,
    a short edit of each mode first: Triton's compiles and autotuning, cuBLAS/cuDNN set-up) or None."""
    editor = Editor.from_checkpoint(checkpoint, config=cfg, device=device, precision=precision, progress=False)
    warmup_s = None
    if warmup:
        t0 = time.perf_counter()
        for mode in MODES:
            ours_edit(editor, image, mode, WARMUP, triton)
        warmup_s = time.perf_counter() - t0
    clocks = {}
    for mode in MODES:
        log.info("ours (triton %s), %s fine-tuning", triton, mode)
        clocks[mode] = ours_edit(editor, image, mode, steps, triton)
    return clocks, warmup_s


# --- the community pipeline -----------------------------------------------------------------------------------

def load_community(path: Path) -> Optional[type]:
    """ImagicStableDiffusionPipeline from the community file, or None (with a one-line message) when it is absent.
    It runs unchanged with diffusers 0.42.1; an adaptation it ever needs belongs here, to the loaded module only."""
    if not path.is_file():
        print(f"community pipeline skipped: {path} not found (git -C <diffusers checkout> show "
              f"HEAD:examples/community/imagic_stable_diffusion.py > {path})")
        return None
    spec = importlib.util.spec_from_file_location("imagic_stable_diffusion_community", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ImagicStableDiffusionPipeline


def community_edit(pipe: "DiffusionPipeline", image: Image.Image, steps: Steps, precision: str,
                   full_lr: float) -> StageClock:
    """train() then one call per alpha and seed. train() runs both stages; stage 2 starts at the first UNet call
    in train mode (train() switches the UNet to train mode just before its fine-tuning loop)."""
    device, size = pipe.device, image.size[0]
    clock = StageClock(device)
    hooks = []

    def at_stage2(module: torch.nn.Module, args: tuple) -> None:
        if module.training:
            clock.lap("stage 1")
            hooks.pop().remove()

    hooks.append(pipe.unet.register_forward_pre_hook(at_stage2))
    torch.manual_seed(0)  # train() draws its noise and timesteps from the global generator
    with OnDevice(device, precision).autocast():
        clock.start()
        pipe.train(PROMPT, image, height=size, width=size, generator=torch.Generator(device).manual_seed(0),
                   embedding_learning_rate=EMBED_LR, diffusion_model_learning_rate=full_lr,
                   text_embedding_optimization_steps=steps.embed, model_fine_tuning_optimization_steps=steps.full)
        clock.lap("stage 2")
        for alpha in ALPHAS:
            for seed in SEEDS:
                pipe(alpha=alpha, height=size, width=size, num_inference_steps=steps.ddim, guidance_scale=GUIDANCE,
                     generator=torch.Generator(device).manual_seed(seed))
        clock.lap("stage 3")
    return clock


def run_community(pipeline_class: type, folder: Path, device: torch.device, precision: str, image: Image.Image,
                  steps: Steps, warmup: bool) -> Tuple[StageClock, Optional[float]]:
    """(clock, warm-up seconds or None). fp32 weights, forward under autocast in `precision` (see the notes)."""
    pipe = pipeline_class.from_pretrained(folder, safety_checker=None, feature_extractor=None).to(device)  # fp32
    pipe.set_progress_bar_config(disable=True)  # __call__'s bar; train()'s own tqdm bars cannot be turned off
    warmup_s = None
    if warmup:
        t0 = time.perf_counter()
        community_edit(pipe, image, WARMUP, precision, full_lr=0.0)  # lr 0: the weights stay as they are
        warmup_s = time.perf_counter() - t0
    log.info("community, full fine-tuning")
    return community_edit(pipe, image, steps, precision, FULL_LR), warmup_s


# --- the table ------------------------------------------------------------------------------------------------

def paper_estimate(clock: StageClock, mode: str, steps: Steps) -> Dict[str, float]:
    """Each stage's seconds scaled linearly from the steps run to the paper's (fixed costs scaled along)."""
    ran = {"stage 1": steps.embed, "stage 2": steps.finetune(mode), "stage 3": steps.ddim}
    paper = {"stage 1": PAPER.embed, "stage 2": PAPER.finetune(mode), "stage 3": PAPER.ddim}
    return {s: clock.seconds[s] * paper[s] / ran[s] for s in STAGES}


def table(clocks: Dict[Tuple[str, str], StageClock], steps: Steps) -> Tuple[List[str], List[List[str]]]:
    """Header and rows: seconds and peak memory per stage, and for a reduced run the paper-settings estimates."""
    reduced = steps != PAPER
    totals = {k: sum(paper_estimate(c, k[1], steps).values()) for k, c in clocks.items()}
    community = totals.get(("community", "full"))
    header = (["variant", "fine-tuning"] + [f"{s} s" for s in STAGES] + ["total s"]
              + [f"{s} peak GiB" for s in STAGES]
              + (["s/step 1 / 2 / 3"] + [f"{s} s, est. at paper steps" for s in STAGES] + ["total s, est."]
                 if reduced else [])
              + [f"community ÷ this, total{' est.' if reduced else ''}"])
    rows = []
    for (name, mode), c in clocks.items():
        ran = (steps.embed, steps.finetune(mode), steps.ddim)
        row = [name, f"LoRA rank 4, {ran[1]} steps" if mode == "lora" else f"full, {ran[1]} steps"]
        row += [f"{c.seconds[s]:.2f}" for s in STAGES] + [f"{c.total:.2f}"]
        row += [f"{c.peak_gib[s]:.2f}" if s in c.peak_gib else "n/a (CPU)" for s in STAGES]
        if reduced:
            est = paper_estimate(c, mode, steps)
            row += [" / ".join(f"{c.seconds[s] / n:.4f}" for s, n in zip(STAGES, ran))]
            row += [f"{est[s]:.1f}" for s in STAGES] + [f"{totals[(name, mode)]:.1f}"]
        row += [f"{community / totals[(name, mode)]:.2f}" if community else "n/a"]
        rows.append(row)
    return header, rows


def ratios(clocks: Dict[Tuple[str, str], StageClock]) -> List[str]:
    """Per-stage ratios that read off what the kernels bring and how far the community pipeline is behind."""
    pairs = [(("ours torch", m), ("ours triton", m), f"ours torch ÷ ours triton ({m})") for m in ("lora", "full")]
    pairs += [(("community", "full"), (v, "full"), f"community ÷ {v} (full)") for v in ("ours triton", "ours torch")]
    out = []
    for num, den, label in pairs:
        if num in clocks and den in clocks:
            cells = ", ".join(f"{s} {clocks[num].seconds[s] / clocks[den].seconds[s]:.2f}" for s in STAGES)
            out.append(f"- {label}: {cells}, total {clocks[num].total / clocks[den].total:.2f}")
    return out


def notes(args: argparse.Namespace, steps: Steps, order: Sequence[str], warmup: Dict[str, float],
          clocks: Dict[Tuple[str, str], StageClock], community_missing: bool) -> List[str]:
    device, precision = torch.device(args.device), args.dtype
    community = ("its weights fp32, no autocast" if precision == "fp32" else
                 f"its weights fp32, `train()` and every call under `torch.autocast({precision})`. Loaded in "
                 f"{precision} it fails (its noise is fp32, so are the noisy latents, which {precision} layers "
                 "refuse: `RuntimeError: mat1 and mat2 must have the same dtype`), and Adam on low-precision "
                 "weights at lr 5e-7 would round every update away")
    out = [f"One edit per row, {args.resolution}x{args.resolution}, prompt {PROMPT!r}: stage 1 = the embedding "
           f"({steps.embed} Adam steps, lr {EMBED_LR:g}; image and text encoding included); stage 2 = fine-tuning "
           f"(LoRA lr {_LORA.finetune_lr:g}, full lr {FULL_LR:g}; ours includes making the weights trainable and "
           f"copying the result out, as `Editor.fit` does); stage 3 = {len(ALPHAS)} alphas x {len(SEEDS)} seeds, "
           f"{steps.ddim} DDIM steps, guidance {GUIDANCE}, VAE decode included. Paper settings: {PAPER.embed} / "
           f"LoRA {PAPER.lora} or full {PAPER.full} / {PAPER.ddim} steps.",
           f"Precision: ours as the Editor runs it (frozen weights {precision}, trainable tensors and Adam state "
           f"fp32, autocast {precision}; VAE fp32). Community: {community}. Its `Accelerator(mixed_precision="
           "\"fp16\")` is never `prepare`d and gives no autocast; on CUDA its `backward` scales the loss by the "
           "GradScaler's 65536, never unscaled (Adam is scale-invariant up to its eps).",
           f"Same weights for all: {'tiny' if args.small else 'SD1.5-size'} random weights (seed {args.seed}, drawn "
           "on the CPU, rounded to bf16), a single file for ours and, converted by diffusers' single-file code, a "
           "diffusers folder for the community pipeline.",
           "Peak memory: `torch.cuda.max_memory_allocated`, reset at the start of each stage (everything resident "
           "counts: only the variant being timed is on the GPU).",
           f"Variants run one after the other ({', '.join(order)}), each on freshly loaded models, not interleaved, "
           + (f"each after a warm-up edit per mode of {WARMUP.embed} + {WARMUP.full} steps and {WARMUP.ddim} DDIM "
              "steps (Triton compiles and autotuning, cuBLAS/cuDNN set-up). Warm-up s: "
              + ", ".join(f"{k} {v:.1f}" for k, v in warmup.items()) + "."
              if warmup else "without a warm-up (`--no-warmup`, the CPU default): first-call costs are in the first "
              "rows."),
           "community ÷ this: the community pipeline's full edit over the row's edit (> 1: the row is faster)."]
    if steps != PAPER:
        out.append(f"Reduced run ({steps.embed} / {steps.lora} LoRA / {steps.full} full / {steps.ddim} DDIM steps): "
                   "the est. columns scale each stage's measured time linearly to the paper's step counts, the "
                   "stage's fixed costs (encoding, fine-tuning set-up, VAE decodes) along with it, so they slightly "
                   "overstate; s/step is each stage's time over its steps (stage 3: per DDIM step of all "
                   f"{len(ALPHAS) * len(SEEDS)} images).")
    if device.type != "cuda":
        out.append("CPU: no allocator statistics (peak n/a), and ours triton is not run (Triton kernels need CUDA; "
                   "under the interpreter this edit took over 15 minutes). A smoke run: times say nothing about a "
                   "GPU.")
    if community_missing:
        out.append(f"Community pipeline not run: {args.community_file} was not found.")
    elif ("community", "full") in clocks:
        import diffusers

        sha = hashlib.sha256(args.community_file.read_bytes()).hexdigest()[:16]
        out.append(f"Community pipeline: {args.community_file} (sha256 {sha}...), loaded with importlib and run "
                   f"unchanged on diffusers {diffusers.__version__}; its own tqdm bars stay on in `train()`.")
    per_stage = ratios(clocks)
    return out + (["Per-stage ratios (> 1: the second is faster):"] + per_stage if per_stage else [])


# --- main -----------------------------------------------------------------------------------------------------

def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="precision (default bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--resolution", type=positive, default=512, help="pixels (a multiple of 64)")
    p.add_argument("--embed-steps", type=positive, default=PAPER.embed)
    p.add_argument("--finetune-steps", type=positive, default=None,
                   help=f"both modes (default: the paper's, LoRA {PAPER.lora}, full {PAPER.full})")
    p.add_argument("--steps", type=positive, default=PAPER.ddim, help="DDIM steps per image")
    p.add_argument("--small", action="store_true", help="tiny widths, SD1 structure: a quick smoke run")
    p.add_argument("--only", choices=["ours", "community"], default=None)
    p.add_argument("--community-file", type=Path, default=DEFAULT_COMMUNITY_FILE)
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "imagic_edit_bench",
                   help="where the random weights are written (and reused by later runs)")
    p.add_argument("--seed", type=int, default=0, help="of the random weights")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="a short edit of each variant before it is timed (default: on CUDA only, where Triton "
                   "autotunes and cuBLAS/cuDNN set up on first use)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --small, else torch's default)")
    args = p.parse_args(argv)
    if args.resolution % 64:
        p.error("--resolution must be a multiple of 64 (the UNet halves the latent three times)")
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.warmup = cuda if args.warmup is None else args.warmup
    # Tiny models gain nothing from a second thread, and on two busy cores OpenMP's barrier made this smoke run
    # 5x slower (4 minutes instead of under one).
    args.threads = (1 if args.small else 0) if args.threads is None else args.threads
    return args


def release(device: torch.device) -> None:
    """Free what the last variant left, so the next one's peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ft = args.finetune_steps
    steps = Steps(args.embed_steps, ft or PAPER.lora, ft or PAPER.full, args.steps)
    cfg = model_config(args.small, args.resolution)
    pipeline_class = load_community(args.community_file) if args.only != "ours" else None
    ours = ours_variants(device) if args.only != "community" else {}
    # The comparison that matters most first, the kernels-off ablation last: each table written on the way keeps
    # what a run cut short by a time limit had measured.
    order = [*list(ours)[:1], *(["community"] if pipeline_class is not None else []), *list(ours)[1:]]
    weights = shared_weights(cfg, args.cache, args.seed)
    image = input_image(args.resolution)
    clocks: Dict[Tuple[str, str], StageClock] = {}
    warmup: Dict[str, float] = {}
    for i, name in enumerate(order):
        if name == "community":
            clocks[(name, "full")], warm = run_community(pipeline_class, diffusers_folder(weights, cfg), device,
                                                         args.dtype, image, steps, args.warmup)
        else:
            by_mode, warm = run_ours(weights / "model.safetensors", cfg, device, args.dtype, image, steps, ours[name],
                                     args.warmup)
            clocks.update({(name, mode): c for mode, c in by_mode.items()})
        if warm is not None:
            warmup[name] = warm
        release(device)
        report(args, cfg, steps, order, clocks, warmup, done=i + 1,
               community_missing=args.only != "ours" and pipeline_class is None)


def report(args: argparse.Namespace, cfg: ModelConfig, steps: Steps, order: Sequence[str],
           clocks: Dict[Tuple[str, str], StageClock], warmup: Dict[str, float], done: int,
           community_missing: bool) -> None:
    """Write the table of the first `done` variants of `order`."""
    device = torch.device(args.device)
    pending = order[done:]
    header, rows = table({k: clocks[k] for k in ROWS if k in clocks}, steps)
    size = "tiny SD1-structured" if args.small else "SD1.5-size"
    extra = [f"Partial table: still to run when it was written: {', '.join(pending)}."] if pending else []
    write_table(result_name("imagic_edit", device, args.dtype, args.small),
                f"One whole Imagic edit: ours vs the diffusers community pipeline ({size} random weights, "
                f"{args.dtype}, {cfg.image_size}x{cfg.image_size}, {device.type})", header, rows,
                extra + notes(args, steps, order, warmup, clocks, community_missing))


if __name__ == "__main__":
    main()
