"""Train the small shipped model (weights/shapes/shapes.safetensors) from scratch on the shapes world, on a CPU.

Same architecture as Stable Diffusion 1.x at small widths: our AutoencoderKL (f = 4: 64x64 RGB -> 16x16x4), our
UNetModel with cross-attention, and an OpenAI-CLIP text encoder (2 layers, width 64) over the real 49,408-token
CLIP vocabulary and tokenizer. Two stages, as LDM trains them (Rombach et al. 2022, Sec. 3):

1. the autoencoder: L1 + MSE reconstruction plus a tiny KL term (no GAN or perceptual loss: the images are
   flat colours; a larger KL weight keeps the posterior noisy and the decoder learns to blur star points and
   triangle corners away). First on random 32x32 crops (the VAE is convolutional: a quarter of the pixels, a
   quarter of the cost, for the easy part: colours and edges), then on full 64x64 images, which the sharp
   corners need. `scale_factor` = 1 / std of the latents, LDM's `scale_by_std`.
2. the UNet and the text encoder together on the frozen autoencoder's latents, velocity prediction (as SD 2.x-v)
   with SD's linear schedule ending at 0.02 instead of 0.012 (see `model_config`), the caption dropped to ""
   10% of the time (classifier-free guidance, Ho & Salimans 2022),
   Min-SNR loss weights (`--timesteps importance` draws the timesteps in proportion to them instead: the same
   objective, little compute spent on nearly pure noise; see `timestep_sampler`) and an EMA of the weights (what is
   saved), both because CPU time is short.
   The latents of a pool of scenes are computed once (posterior mean and std; a fresh posterior sample is drawn
   every time a scene is used): the encoder would otherwise cost as much as the UNet step.

Data parallel over `--procs` processes of `--threads` torch threads each (default 2 x 1, one per core of a
2-core machine: a UNet step of batch 32 of the 4-head model shipped until stop 23 took 1.53 s in one process, 0.91 s
in two on half batches; a second intra-op thread helps this tiny model less). The gradients are averaged across processes (one all-reduce of all of them per
step, gloo, over a file store in --work), so every process holds the same weights; the batch is the global one,
split. Rank 0 draws the random streams a single process draws, so `--procs 1` trains the same model in about twice
the time (up to rounding: the fused optimiser, the all-reduce's order of sums).

Everything is seeded; training scenes come from namespace 0 of `imagic.shapes.scene_for_seed` (evaluation uses
other namespaces). Writes shapes.safetensors + shapes.yaml (fp16), curves (CSV, PNG), a txt2img sample grid and
train_summary.json into --out; intermediate state goes to --work.

    python weights/shapes/train.py                 # the shipped recipe, two data-parallel processes
    python weights/shapes/train.py --procs 1       # the same in one process
    python weights/shapes/train.py --head-channels -1 --unet-ch-mult 1,2,4   # the model shipped until stop 23
    python weights/shapes/train.py --stage unet    # reuse the VAE from --work

Interrupted, the same command resumes: the autoencoder is reused when --work holds one trained with the same
settings (a half-trained one, ~7 minutes, starts over), and the UNet continues from its last resumable state.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from imagic import shapes as S
from imagic.clip import build_text_encoder
from imagic.config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from imagic.export import save_checkpoint
from imagic.fileio import atomic_path, write_csv, write_json
from imagic.images import make_grid, save_png
from imagic.rundir import plot_losses
from imagic.schedule import NoiseSchedule
from imagic.tokenizer import Tokenizer
from imagic.unet import UNetModel
from imagic.vae import AutoencoderKL

HERE = Path(__file__).resolve().parent


def model_config(prediction: str = "v", linear_end: float = 0.02,
                 attention_resolutions: Tuple[int, ...] = (1, 2, 4), head_channels: int = 32,
                 context_length: int = 77, vae_ch_mult: Tuple[int, ...] = (1, 2, 2),
                 latent_channels: int = 4, unet_ch_mult: Tuple[int, ...] = (1, 1, 4)) -> ModelConfig:
    """The shipped architecture: ~16 MB in fp16, 40% of it the CLIP token embedding (49408 x 64).

    Departures from SD 1.x, each measured on this world (weights/shapes/README.md):
    - the schedule ends at 0.02, not 0.012: a 16x16 latent keeps more signal at t = 999 than a 64x64 one does under
      the same schedule (Hoogeboom et al. 2023, "simple diffusion", Sec. 3: smaller images need more noise), so
      sampling from pure noise started off the training distribution;
    - cross-attention at every level including the full 16x16 latent, where a 64x64 shape spans only a few latent
      pixels: without it, txt2img drew the asked shape no more often than chance (colour and background were right);
    - heads of 32 channels (SD 2.x's `num_head_channels`; -1 gives SD 1.x's 4 heads at every level): one head at
      16x16 has one 256 x 256 score matrix per image where four heads of 8 have four, so the CPU step is ~30%
      cheaper (self-attention fwd+bwd of a half batch: 39-49 ms with 4 heads, 9 ms with one);
    - UNet widths 32/32/128 (`unet_ch_mult` (1, 1, 4); SD's pattern is (1, 2, 4)): every level costs about the
      same per convolution, so a narrow 8x8 level saves another 15-20% per step. It kept shapes, colours and
      backgrounds; (1, 2, 2), a narrow 4x4 level and middle block, drew backgrounds that follow the seed.
    The model shipped until stop 23 had 4 heads and widths 32/64/128 and took ~72 minutes to train; this one took
    40.5. `context_length` < 77 drops padding positions (a caption is 9 tokens), but it cost shapes (35% vs
    44% of 96 samples): the UNet's 16x16 cross-attention puts most of its weight on the end-of-text and padding
    positions, causal summaries of the whole caption. `vae_ch_mult` (1, 2, 2, 2) makes the autoencoder f = 8 (an
    8x8 latent) and `latent_channels` sets the latent's depth (SD: 4)."""
    return ModelConfig(
        family="custom", prediction_type=prediction, image_size=S.IMAGE_SIZE, linear_end=linear_end,  # type: ignore
        unet=UNetConfig(model_channels=32, channel_mult=unet_ch_mult, attention_resolutions=attention_resolutions,
                        num_res_blocks=1, num_heads=-1 if head_channels > 0 else 4,
                        num_head_channels=head_channels, context_dim=64, in_channels=latent_channels,
                        out_channels=latent_channels),
        vae=VAEConfig(ch=32, ch_mult=vae_ch_mult, num_res_blocks=1, resolution=S.IMAGE_SIZE,
                      z_channels=latent_channels, embed_dim=latent_channels),
        text=TextConfig(kind="openai", width=64, layers=2, heads=2, mlp_width=256, projection_dim=64,
                        context_length=context_length))


def images_tensor(scenes: Sequence[S.Scene]) -> torch.Tensor:
    """Renders as a (B, 3, H, W) float tensor in [-1, 1]."""
    arr = np.stack([S.render(s) for s in scenes]).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0)


def cosine_lr(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class Clock:
    """Wall and CPU seconds (of this process) since the start, carried over when a run is resumed."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0):
        self.wall0, self.cpu0 = time.time() - wall, time.process_time() - cpu

    def read(self) -> Dict[str, float]:
        return {"elapsed_s": round(time.time() - self.wall0, 1), "cpu_s": round(time.process_time() - self.cpu0, 1)}


class Group:
    """This process's place among the data-parallel workers (a world of 1 when there is only one)."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int, what: str) -> int:
        """This process's part of a global batch of n."""
        if n % self.world:
            raise SystemExit(f"{what} {n} does not split over {self.world} processes")
        return n // self.world

    def average_gradients(self, params: List[torch.nn.Parameter]) -> None:
        """Mean of every process's gradients, in one all-reduce of them all flattened (hundreds of small
        all-reduces would cost more than the step's maths). A parameter without a gradient counts as zeros."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        for p, part in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = part.view_as(p)

    def total(self, values: Dict[str, float]) -> Dict[str, float]:
        """Sums over the processes."""
        if self.world == 1:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64)
        dist.all_reduce(t)
        return dict(zip(values, t.tolist()))

    def average_logs(self, logged: Dict[str, float]) -> Dict[str, float]:
        return {k: v / self.world for k, v in self.total(logged).items()}

    def gather(self, obj):
        """Every process's obj, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def train_loop(name: str, opt: torch.optim.Optimizer, loss_fn: Callable[[int], Dict[str, float]], steps: int,
               lr: float, log_every: int, clock: Clock, group: Group,
               after_step: Optional[Callable[[int, List], None]] = None,
               start: int = 0, rows: Optional[List[Dict[str, float]]] = None) -> List[Dict[str, float]]:
    """Cosine schedule, grad clipping at 1, from step `start`. `loss_fn(step)` runs forward and backward on this
    process's part of the batch and returns the numbers to log; the gradients are averaged over the group before
    clipping, so every process takes the same step.
    `after_step(step, rows)` runs after each optimiser step."""
    params = [p for g in opt.param_groups for p in g["params"]]
    rows, window = list(rows or []), []
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        logged = loss_fn(step)
        group.average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        window.append(logged)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            mean = group.average_logs({k: float(np.mean([w[k] for w in window])) for k in window[0]})
            times = clock.read()  # CPU seconds summed over the processes
            row = {"step": step + 1, **mean, "lr": opt.param_groups[0]["lr"], "elapsed_s": times["elapsed_s"],
                   "cpu_s": round(group.total({"cpu": times["cpu_s"]})["cpu"], 1)}
            rows.append(row)
            window = []
            if group.main:
                print(f"{name} {row}", flush=True)
        if after_step is not None:
            after_step(step + 1, rows)
    return rows


def adamw(params: List[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """No weight decay: an unused token embedding must not shrink (and `CompactVocabulary` is exact only
    without it). Fused: one kernel for the few hundred tensors, about 3x faster than the for-each version on a
    CPU (imagic.training.make_adam)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)


# --- stage 1: the autoencoder ----------------------------------------------------------------------------------

def train_vae(cfg: ModelConfig, args: argparse.Namespace, clock: Clock, group: Group):
    """Every process starts from the same seeded weights and draws its own scenes."""
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(cfg.vae).train()
    rng = np.random.default_rng([0, args.seed, 1] + ([group.rank] if group.rank else []))  # rank 0: --procs 1's
    crops, full_images = group.share(args.vae_batch, "--vae-batch"), group.share(args.vae_batch // 2, "--vae-batch/2")

    def loss_fn(step: int) -> Dict[str, float]:
        full = step >= args.vae_crop_steps
        x = images_tensor([S.random_scene(rng) for _ in range(full_images if full else crops)])
        if not full:  # one random 32x32 crop per batch, on the latent grid
            f = cfg.vae.downsample_factor
            i, j = (int(v) * f for v in rng.integers(0, (S.IMAGE_SIZE - 32) // f + 1, size=2))
            x = x[:, :, i:i + 32, j:j + 32]
        post = vae.encode(x)
        rec = vae.decode(post.sample())
        l1, l2 = (rec - x).abs().mean(), F.mse_loss(rec, x)
        kl = 0.5 * (post.mean ** 2 + post.std ** 2 - 1 - post.logvar).sum(dim=(1, 2, 3)).mean()
        edge = gradient_l1(rec if args.edge_weight else rec.detach(), x)  # logged either way; no backward at 0
        loss = l1 + l2 + args.kl_weight * kl + args.edge_weight * edge
        loss.backward()
        return {"l1": l1.item(), "mse": l2.item(), "kl": kl.item(), "edge": edge.item()}

    rows = train_loop("vae", adamw(list(vae.parameters()), args.vae_lr), loss_fn, args.vae_steps, args.vae_lr, 25,
                      clock, group)
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # LDM's scale_by_std: unit-variance latents for the diffusion model
        z = torch.cat([vae.encode(images_tensor([S.random_scene(rng) for _ in range(64)])).mean
                       for _ in range(4)])
    return vae, 1.0 / float(z.flatten().std()), rows


def gradient_l1(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical pixel differences of two images: it grows where a reconstruction
    softens an edge or a corner (a star point), which L1 and MSE on the pixels weigh by its few pixels only."""
    return sum((torch.diff(rec, dim=d) - torch.diff(x, dim=d)).abs().mean() for d in (-1, -2))


# --- stage 2: UNet + text encoder --------------------------------------------------------------------------

def encode_pool(vae: AutoencoderKL, n: int, seed: int, group: Group, batch: int = 64):
    """Posterior mean and std of this process's share of n training scenes (namespace 0: every world-th one), and
    their captions. Each process samples its half batches from its own share."""
    scenes = [S.scene_for_seed(i, namespace=0) for i in range(seed * 10**6 + group.rank, seed * 10**6 + n, group.world)]
    means, stds = [], []
    with torch.no_grad():
        for k in range(0, len(scenes), batch):
            post = vae.encode(images_tensor(scenes[k:k + batch]))
            means.append(post.mean)
            stds.append(post.std)
    return torch.cat(means), torch.cat(stds), [s.caption for s in scenes]


def train_unet(cfg: ModelConfig, vae: AutoencoderKL, args: argparse.Namespace, group: Group):
    """Resumable: every `--save-every` steps the whole state (weights, EMA, optimiser, every process's random
    stream) goes to `--work/unet_state.pt`, and a run that finds it continues from there exactly (with as many
    processes). Every process starts from the same seeded weights; each has its own random stream."""
    torch.manual_seed(args.seed + 1)
    unet, text = UNetModel(cfg.unet).train(), build_text_encoder(cfg.text).train()
    tokenizer = Tokenizer.for_text_config(cfg.text)
    vocab = CompactVocabulary(text, tokenizer(world_captions() + [""]))
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = adamw(params, args.unet_lr)
    gen = torch.Generator().manual_seed(args.seed + 2 + 1000 * group.rank)
    batch = group.share(args.batch, "--batch")
    state_file = args.work / "unet_state.pt"
    modules = {"unet": unet, "text": text, "ema_unet": ema_unet, "ema_text": ema_text, "opt": opt}
    start, rows, clock = 0, [], Clock()
    if state_file.exists():
        state = torch.load(state_file, weights_only=True)
        for k, m in modules.items():
            m.load_state_dict(state[k])
        if len(state["rng"]) != group.world:
            raise SystemExit(f"{state_file} was saved by {len(state['rng'])} processes; resume with --procs "
                             f"{len(state['rng'])}")
        gen.set_state(state["rng"][group.rank])
        start, rows = state["step"], state["rows"]
        clock = Clock(rows[-1]["elapsed_s"], rows[-1]["cpu_s"] / group.world)
        if group.main:
            print(f"resuming from step {start}", flush=True)
    schedule = NoiseSchedule.from_config(cfg)
    means, stds, captions = encode_pool(vae, args.pool, args.seed, group)
    if group.main:
        print(f"encoded a pool of {args.pool} scenes at {clock.read()}", flush=True)
    ids = vocab.remap(tokenizer(captions))
    empty = vocab.remap(tokenizer(""))
    draw_timesteps = timestep_sampler(schedule, args.min_snr_gamma, args.timesteps, args.weight_floor)

    def loss_fn(step: int) -> Dict[str, float]:
        idx = torch.randint(0, len(captions), (batch,), generator=gen)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * cfg.scale_factor
        drop = torch.rand(batch, generator=gen) < args.uncond_prob
        tok = torch.where(drop[:, None], empty, ids[idx])
        t, weight = draw_timesteps(batch, gen)
        noise = torch.randn(z0.shape, generator=gen)
        noise = noise + args.offset_noise * torch.randn(z0.shape[:2] + (1, 1), generator=gen)
        pred = unet(schedule.add_noise(z0, noise, t), t, text(tok))
        mse = (pred - schedule.training_target(z0, noise, t)).pow(2).mean(dim=(1, 2, 3))
        loss = (weight * mse).mean()
        loss.backward()
        return {"loss": loss.item(), "mse": mse.mean().item()}

    pairs = list(zip(ema_unet.parameters(), unet.parameters())) + list(zip(ema_text.parameters(), text.parameters()))

    def after_step(step: int, rows: List[Dict[str, float]]) -> None:
        decay = min(args.ema, (1 + step) / (10 + step))  # short memory at first, as in LDM's LitEma
        with torch.no_grad():
            for e, p in pairs:
                e.lerp_(p, 1 - decay)
        if step % args.save_every == 0 and step < args.unet_steps and rows and rows[-1]["step"] == step:
            streams = group.gather(gen.get_state())
            if group.main:
                with atomic_path(state_file) as tmp:
                    torch.save({**{k: m.state_dict() for k, m in modules.items()}, "rng": streams,
                                "step": step, "rows": rows}, tmp)
        if args.snapshot_every and step % args.snapshot_every == 0 and step < args.unet_steps and group.main:
            save_checkpoint(args.work / f"shapes_step{step}.safetensors", ema_unet, vae, vocab.full(ema_text), cfg)

    rows = train_loop("unet", opt, loss_fn, args.unet_steps, args.unet_lr, 50, clock, group, after_step, start, rows)
    return ema_unet.eval(), vocab.full(ema_text).eval(), rows


def world_captions() -> List[str]:
    """Every caption of the shapes world (4 shapes x 6 colours x 5 other backgrounds = 120)."""
    return [S.caption(shape, color, bg) for shape in S.SHAPES for color in S.COLORS for bg in S.COLORS if bg != color]


class CompactVocabulary:
    """Trains only the token-embedding rows that the world's captions use (15 of CLIP's 49,408: start,
    end/padding, 13 words), and puts the whole table back for saving.

    Exact: a row that never gets a gradient never moves under AdamW without weight decay (its moments stay 0, so
    its update is 0), nor under the EMA of an unchanged row, nor does it change the gradient-norm clip. So the
    saved model is the one training the full table gives, without the per-step passes over its 3.2 M values
    (dense gradient, clip, AdamW, EMA, all-reduce) that cost ~20 ms of a ~0.5 s step.

    `text`'s token embedding is replaced by the compact table in place; feed it `remap(ids)`."""

    def __init__(self, text: torch.nn.Module, ids: torch.Tensor):
        self.name = next(n for n, m in text.named_modules() if n.endswith("token_embedding"))
        table = text.get_submodule(self.name)
        self.initial = table.weight.detach().clone()  # the rows no caption uses stay at their initial values
        self.used = torch.unique(ids)
        self.index = torch.full((table.num_embeddings,), -1, dtype=torch.long)
        self.index[self.used] = torch.arange(len(self.used))
        compact = torch.nn.Embedding(len(self.used), table.embedding_dim)
        with torch.no_grad():
            compact.weight.copy_(self.initial[self.used])
        self._put(text, compact)

    def remap(self, ids: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids -> rows of the compact table."""
        rows = self.index[ids]
        if bool((rows < 0).any()):
            raise ValueError(f"tokens outside the compact vocabulary: {sorted(set(ids[rows < 0].tolist()))}")
        return rows

    def full(self, text: torch.nn.Module) -> torch.nn.Module:
        """A copy of `text` (or of its EMA) with the whole vocabulary table: the trained rows in the initial one."""
        out = copy.deepcopy(text)
        table = torch.nn.Embedding(*self.initial.shape)
        with torch.no_grad():
            table.weight.copy_(self.initial)
            table.weight[self.used] = text.get_submodule(self.name).weight
        self._put(out, table)
        return out

    def _put(self, text: torch.nn.Module, table: torch.nn.Embedding) -> None:
        parent, _, attr = self.name.rpartition(".")
        setattr(text.get_submodule(parent), attr, table)


def min_snr_weight(schedule: NoiseSchedule, t: torch.Tensor, gamma: float, floor: float = 0.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., ICCV 2023): min(SNR, gamma) / SNR for epsilon prediction,
    min(SNR, gamma) / (SNR + 1) for velocity prediction. The nearly clean timesteps stop dominating the
    gradient, which speeds up training several times.

    `floor` > 0 raises every weight to at least that. For v-prediction the Min-SNR weight falls to ~SNR at high
    noise (0.025 at t = 700 of the 0.02 schedule, 45% of the timesteps under 0.1), where txt2img has to commit to
    the caption's shape: img2img of held-out scenes from strength 0.7 kept the shape of 7/24 non-circles with the
    shipped model, 3/24 with a model of lower loss that draws shapes at chance. A 2300-step run with floor 0.3
    drew shapes at chance too (weights/shapes/README.md)."""
    abar = schedule.alphas_cumprod[t].float()
    snr = abar / (1 - abar)
    return (snr.clamp(max=gamma) / (snr + 1 if schedule.prediction_type == "v" else snr)).clamp(min=floor)


def timestep_sampler(schedule: NoiseSchedule, gamma: float, mode: str, floor: float = 0.0
                     ) -> Callable[[int, torch.Generator], Tuple[torch.Tensor, torch.Tensor]]:
    """`draw(n, generator)` -> (timesteps, loss weights) whose weighted loss has, in expectation, the
    Min-SNR-gamma objective E_{t ~ uniform}[w(t) mse(t)].

    "uniform": t uniform, weights w(t). "importance": t drawn with probability w(t) / sum w and a constant weight
    mean(w), which gives the same expectation (Kingma & Gao, NeurIPS 2023: a loss weighting and a timestep
    distribution are interchangeable) at a lower variance: uniform draws spend 45% of the batch on timesteps
    with w < 0.1 (the nearly pure noise of the 0.02 schedule end), which cost a whole UNet pass each and move
    the weights by almost nothing. With w's spread, E[w^2] / E[w]^2 = 2.1: the t-part of the gradient's variance
    halves. Measured on the shapes world it helps less than that suggests: it does not make up for a halved
    batch, nor for 45% fewer steps (weights/shapes/README.md)."""
    w = min_snr_weight(schedule, torch.arange(schedule.num_timesteps), gamma, floor)
    if mode not in ("uniform", "importance"):
        raise ValueError(f"unknown timestep sampling {mode!r}")
    probs, mean = w / w.sum(), w.mean()

    def uniform(n: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        t = schedule.sample_timesteps(n, gen)
        return t, w[t]

    def importance(n: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        t = torch.multinomial(probs, n, replacement=True, generator=gen)
        return t, mean.expand(n)

    return uniform if mode == "uniform" else importance


# --- outputs -------------------------------------------------------------------------------------------------

def sample_grid(ckpt: Path, out: Path, seeds: Sequence[int] = (0, 1, 2)) -> Dict[str, float]:
    """txt2img through the public loader and editor for one prompt per shape x colour pair (backgrounds
    rotate), scored with the analyser: the fraction of images showing the prompt's shape, colour, background."""
    from imagic.editor import Editor
    from imagic.loader import load_checkpoint

    editor = Editor(load_checkpoint(ckpt), device="cpu", progress=False)
    colors = list(S.COLORS)
    rows, labels, hits = [], [], {"shape": 0, "color": 0, "background": 0, "all": 0}
    n = 0
    for i, shape in enumerate(S.SHAPES):
        for j, color in enumerate(colors[:4]):
            bg = colors[(i + j + 1) % len(colors)]
            bg = bg if bg != color else colors[(i + j + 2) % len(colors)]
            imgs = editor.txt2img(S.caption(shape, color, bg), seeds=list(seeds), guidance_scale=4.0, steps=25)
            rows.append(imgs)
            labels.append(f"{color} {shape} / {bg}")
            for img in imgs:
                a = S.analyze(img)
                ok = {"shape": a.shape == shape, "color": a.color == color, "background": a.background == bg}
                for k, v in ok.items():
                    hits[k] += v
                hits["all"] += all(ok.values())
                n += 1
    save_png(make_grid(rows, row_labels=labels, col_labels=[f"seed {s}" for s in seeds]), out)
    return {k: v / n for k, v in hits.items()}


def img2img_shape_kept(ckpt: Path, strengths: Sequence[float], n: int = 24) -> Dict[float, float]:
    """Where a model loses shapes: img2img (SDEdit) of `n` held-out scenes (tuning namespace 2, circles left out:
    a blob reads as a circle) with their own caption, from each strength; the fraction whose analysed shape is
    still the scene's. Strength 0.1 starts at t = 100 (SNR 7.6 on the 0.02 schedule), 0.3 at SNR 1, 0.7 at 0.03."""
    from imagic.editor import Editor
    from imagic.loader import load_checkpoint

    editor = Editor(load_checkpoint(ckpt), device="cpu", progress=False)
    scenes = [s for s in (S.scene_for_seed(i, namespace=2) for i in range(10 * n)) if s.shape != "circle"][:n]
    kept = {}
    for strength in strengths:
        hits = sum(S.analyze(editor.img2img(S.render_pil(s), S.caption(s.shape, s.color, s.background),
                                            strength=strength, seeds=[0], guidance_scale=4.0, steps=25)[0]).shape
                   == s.shape for s in scenes)
        kept[strength] = hits / len(scenes)
    return kept


EXAMPLE = S.Scene("circle", "red", "blue", cx=23.0, cy=38.0, size=11.0)  # off-centre, so a kept position shows


def write_example(out: Path) -> Path:
    """The demo's input image (`make demo`): a red circle on a blue background."""
    path = out / "example_red_circle.png"
    save_png(S.render_pil(EXAMPLE), path)
    return path


def plot_curves(vae_rows: List[Dict[str, float]], unet_rows: List[Dict[str, float]], path: Path) -> None:
    curves = {}
    if vae_rows:
        curves["VAE L1 (per 25 steps)"] = [r["l1"] for r in vae_rows]
    if unet_rows:
        # The objective, comparable across --timesteps (the plain MSE is over differently drawn t); with
        # --weight-floor the weights are floored, so compare such runs by the logged "mse" instead.
        curves["UNet + text: Min-SNR-weighted v MSE (per 50 steps)"] = [r["loss"] for r in unet_rows]
    save_png(plot_losses(curves), path)


def int_tuple(text: str) -> Tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def parser() -> argparse.ArgumentParser:
    """The recipe's knobs; their defaults are the shipped file's settings (tests/test_shapes_train.py)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--work", type=Path, default=Path("runs/shapes_train"))
    p.add_argument("--stage", choices=["all", "vae", "unet"], default="all")
    p.add_argument("--procs", type=int, default=2, help="data-parallel processes (the batches split over them)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1100)
    p.add_argument("--vae-crop-steps", type=int, default=600, help="steps on 32x32 crops before full images")
    p.add_argument("--vae-batch", type=int, default=16, help="crops per step (half as many full images)")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-8)
    p.add_argument("--edge-weight", type=float, default=0.0,
                   help="weight of an L1 loss on the autoencoder's pixel differences (sharper edges)")
    p.add_argument("--pool", type=int, default=6000)
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--prediction", choices=["epsilon", "v"], default="v")
    p.add_argument("--linear-end", type=float, default=0.02, help="end of SD's linear beta schedule")
    p.add_argument("--offset-noise", type=float, default=0.0, help="std of a per-channel constant added to the noise")
    p.add_argument("--attention-resolutions", type=int_tuple, default=(1, 2, 4),
                   help="latent downsampling factors with cross-attention (1 = the full 16x16 latent)")
    p.add_argument("--head-channels", type=int, default=32,
                   help="channels per attention head (-1: 4 heads at every level, as SD 1.x fixes their number, "
                        "the model shipped until stop 23)")
    p.add_argument("--context-length", type=int, default=77,
                   help="text tokens per prompt (SD's 77; every shapes caption is 9 with start and end)")
    p.add_argument("--vae-ch-mult", type=int_tuple, default=(1, 2, 2),
                   help="autoencoder channel multipliers; one downsampling per entry after the first (f = 4)")
    p.add_argument("--latent-channels", type=int, default=4, help="channels of the latent (SD: 4)")
    p.add_argument("--unet-ch-mult", type=int_tuple, default=(1, 1, 4),
                   help="UNet channel multipliers of model_channels 32, one per level (16x16, 8x8, 4x4; "
                        "SD's pattern 1,2,4 is the model shipped until stop 23)")
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--weight-floor", type=float, default=0.0,
                   help="lowest loss weight of any timestep (0: plain Min-SNR, the shipped run)")
    p.add_argument("--timesteps", choices=["uniform", "importance"], default="uniform",
                   help="draw t uniformly and weight the loss (the shipped run), or in proportion to its Min-SNR "
                        "weight (the same objective, less variance)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the UNet and text encoder weights")
    p.add_argument("--snapshot-every", type=int, default=1000, help="UNet steps between snapshots in --work")
    p.add_argument("--save-every", type=int, default=250, help="UNet steps between resumable states in --work")
    return p


def args_config(args: argparse.Namespace) -> ModelConfig:
    """The architecture the arguments ask for."""
    return model_config(args.prediction, args.linear_end, args.attention_resolutions, args.head_channels,
                        args.context_length, args.vae_ch_mult, args.latent_channels, args.unet_ch_mult)


def main() -> None:
    args = parser().parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.procs == 1:
        run(0, args)
        return
    store = args.work / "dist_store"  # gloo's rendezvous; a stale one from a killed run would hang the next
    store.unlink(missing_ok=True)
    mp.spawn(run, args=(args, os.getpid()), nprocs=args.procs)


def run(rank: int, args: argparse.Namespace, launcher: Optional[int] = None) -> None:
    """One data-parallel worker; rank 0 writes every output."""
    torch.set_num_threads(args.threads)
    if args.procs == 1:
        train(args, Group())
        return
    exit_with(launcher)
    dist.init_process_group("gloo", init_method=(args.work / "dist_store").resolve().as_uri(), rank=rank,
                            world_size=args.procs)
    try:
        train(args, Group(rank, args.procs))
    finally:
        dist.destroy_process_group()


def exit_with(launcher: Optional[int], every: float = 1.0) -> None:
    """Ends this worker as soon as its launching process is gone. `mp.spawn` workers outlive a launcher killed by a
    signal (SIGTERM or SIGKILL skip its clean-up), and would go on training and saving into `--work`, racing the run
    that resumes there. Every file is written atomically, so exiting at any point leaves the last saved state whole."""
    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(every)
        os._exit(1)

    if launcher is not None:
        threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


def train(args: argparse.Namespace, group: Group) -> None:
    """The stages `--stage` asks for: the autoencoder (saved to --work/vae.pt), then UNet + text on it."""
    cfg = args_config(args)
    vae_file = args.work / "vae.pt"
    if args.stage == "vae" or (args.stage == "all" and not vae_done(vae_file, args, group)):
        vae, scale, vae_rows = train_vae(cfg, args, Clock(), group)
        if group.main:
            with atomic_path(vae_file) as tmp:
                torch.save({"vae": vae.state_dict(), "scale_factor": scale, "rows": vae_rows,
                            "settings": vae_settings(args)}, tmp)
            write_csv(args.out / "curve_vae.csv", list(vae_rows[0]), [list(r.values()) for r in vae_rows])
        group.barrier()  # the others read vae.pt next
        if args.stage == "vae":
            return
    saved = torch.load(vae_file, weights_only=True)
    vae = AutoencoderKL(cfg.vae)
    vae.load_state_dict(saved["vae"])
    vae.eval().requires_grad_(False)
    cfg.scale_factor, vae_rows = saved["scale_factor"], saved["rows"]
    unet, text, unet_rows = train_unet(cfg, vae, args, group)
    if group.main:
        write_outputs(cfg, args, vae, unet, text, vae_rows, unet_rows)


def vae_settings(args: argparse.Namespace) -> Dict[str, str]:
    """The arguments that decide the autoencoder: an interrupted run with the same ones reuses its vae.pt."""
    keys = ("seed", "procs", "vae_steps", "vae_crop_steps", "vae_batch", "vae_lr", "kl_weight", "edge_weight",
            "vae_ch_mult", "latent_channels")
    return {k: repr(getattr(args, k)) for k in keys}


def vae_done(vae_file: Path, args: argparse.Namespace, group: Group) -> bool:
    """Whether --work already holds the autoencoder these arguments would train."""
    if not vae_file.exists() or torch.load(vae_file, weights_only=True).get("settings") != vae_settings(args):
        return False
    if group.main:
        print(f"reusing the autoencoder in {vae_file} (trained with the same settings)", flush=True)
    return True


def write_outputs(cfg: ModelConfig, args: argparse.Namespace, vae: AutoencoderKL, unet: UNetModel,
                  text: torch.nn.Module, vae_rows: List[Dict[str, float]], unet_rows: List[Dict[str, float]]) -> None:
    """The checkpoint (fp16), curves, demo input, sample grid and train_summary.json into --out."""
    write_csv(args.out / "curve_unet.csv", list(unet_rows[0]), [list(r.values()) for r in unet_rows])
    ckpt = save_checkpoint(args.out / "shapes.safetensors", unet, vae, text, cfg, dtype=torch.float16)
    # Wall time depends on what else the machine runs; CPU time (all processes) is what the recipe needs.
    vae_s, vae_cpu = vae_rows[-1]["elapsed_s"], vae_rows[-1]["cpu_s"]
    unet_s, unet_cpu = unet_rows[-1]["elapsed_s"], unet_rows[-1]["cpu_s"]
    plot_curves(vae_rows, unet_rows, args.out / "curves.png")
    write_example(args.out)
    scores = sample_grid(ckpt, args.out / "samples.png")
    summary = {"wall_seconds": {"vae": vae_s, "unet_and_text": round(unet_s, 1), "total": round(vae_s + unet_s, 1)},
               "cpu_seconds": {"vae": vae_cpu, "unet_and_text": round(unet_cpu, 1),
                               "total": round(vae_cpu + unet_cpu, 1)},
               "scale_factor": cfg.scale_factor, "processes": args.procs, "torch_threads": args.threads,
               "args": {k: str(v) for k, v in vars(args).items()},
               "txt2img_correct": scores, "file_mb": round(ckpt.stat().st_size / 1e6, 2)}
    write_json(args.out / "train_summary.json", summary)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
