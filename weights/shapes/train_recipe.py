"""The shapes recipe's settings: the model's architecture (`model_config`, and `args_config` for the command
line's), the optimiser and its learning-rate schedule, the loss terms and weights of both stages (the
autoencoder's edge term, Min-SNR weights and the timestep sampler built on them), and `CompactVocabulary`, which
trains only the token-embedding rows the world's captions use."""
from __future__ import annotations

import argparse
import copy
import math
from typing import Callable, List, Tuple

import torch

from imagic import shapes as S
from imagic.config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from imagic.schedule import NoiseSchedule


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


def args_config(args: argparse.Namespace) -> ModelConfig:
    """The architecture the arguments ask for."""
    return model_config(args.prediction, args.linear_end, args.attention_resolutions, args.head_channels,
                        args.context_length, args.vae_ch_mult, args.latent_channels, args.unet_ch_mult)


def cosine_lr(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.05) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from `peak` down to `floor * peak` at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(params: List[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """No weight decay: an unused token embedding must not shrink (and `CompactVocabulary` is exact only
    without it). Fused: one kernel for the few hundred tensors, about 3x faster than the for-each version on a
    CPU (imagic.training.make_adam)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)


def gradient_l1(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical pixel differences of two images: it grows where a reconstruction
    softens an edge or a corner (a star point), which L1 and MSE on the pixels weigh by its few pixels only."""
    return sum((torch.diff(rec, dim=d) - torch.diff(x, dim=d)).abs().mean() for d in (-1, -2))


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
