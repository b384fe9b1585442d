"""The Stable Diffusion UNet: a port of ldm/modules/diffusionmodules/openaimodel.py `UNetModel` and of its SDXL
version, sgm/modules/diffusionmodules/openaimodel.py (Stability-AI/generative-models).

Only what SD 1.x/2.x and SDXL use is kept (2-D, conv resampling, no scale-shift norm, spatial transformers at
`attention_resolutions` with one depth or one per level, SDXL's vector conditioning `y` through `label_emb`), but
the blocks are built by the original loop so every attribute name and `nn.Sequential` index equals the checkpoint
keys under `model.diffusion_model.`: `time_embed.{0,2}`, `label_emb.0.{0,2}`, `input_blocks.N.M`,
`middle_block.{0,1,2}`, `output_blocks.N.M`, `out.{0,2}`.
Parameter-free layers (SiLU, Dropout) stay at their indices so the numbers line up, even where the forward fuses
a SiLU into the preceding GroupNorm (`kernels.group_norm(..., silu=True)`, numerically the same).
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from imagic.attention import BasicTransformerBlock, GroupNorm, SpatialTransformer, maybe_checkpoint, zero_module
from imagic.config import UNetConfig


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (N,) timesteps -> (N, dim), cos half first then sin (ldm util.timestep_embedding).

    Frequencies are max_period ** (-i / half) for i < half, computed in fp32; odd `dim` gets a zero column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None].to(timesteps.device)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def normalization(channels: int) -> GroupNorm:
    """ldm's GroupNorm32: 32 groups, eps 1e-5, computed in fp32 and cast back (the silent-bug list's first item)."""
    return GroupNorm(32, channels)


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between; 1x1 conv on the skip when channels change."""

    def __init__(self, channels: int, emb_channels: int, out_channels: Optional[int] = None,
                 use_checkpoint: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(0.0),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, self.use_checkpoint, x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm, _, conv = self.in_layers  # the SiLU at index 1 is fused into the norm
        h = conv(norm(x, silu=True))
        h = h + self.emb_layers(emb)[:, :, None, None]
        norm, _, dropout, conv = self.out_layers
        h = conv(dropout(norm(h, silu=True)))
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv with padding 1 (the UNet's; the VAE pads asymmetrically instead)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding to ResBlocks and the text context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Noise (or velocity) prediction network eps_theta(x_t, t, context[, y]) of Stable Diffusion 1.x/2.x/XL."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = dataclasses.replace(cfg)  # a copy: set_gradient_checkpointing must not edit the caller's config
        mc = cfg.model_channels
        time_embed_dim = mc * 4
        self.time_embed = nn.Sequential(
            nn.Linear(mc, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))
        if cfg.num_classes is not None:
            if cfg.num_classes != "sequential" or cfg.adm_in_channels is None:
                raise ValueError("a vector-conditioned UNet needs num_classes 'sequential' and adm_in_channels")
            # SDXL's y embedding; the nesting is sgm's, hence the keys label_emb.0.0 and label_emb.0.2.
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_in_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)))

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, ch_out, use_checkpoint=cfg.use_checkpoint)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        input_block_chans = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: List[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(self._transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), self._transformer(ch, -1), res(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + input_block_chans.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(self._transformer(ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(mc, cfg.out_channels, 3, padding=1)))

    def _transformer(self, ch: int, level: int) -> SpatialTransformer:
        heads, dim_head = self.cfg.heads_for(ch)
        return SpatialTransformer(ch, heads, dim_head, depth=self.cfg.depth_at(level),
                                  context_dim=self.cfg.context_dim,
                                  use_linear=self.cfg.use_linear_in_transformer,
                                  use_checkpoint=self.cfg.use_checkpoint)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Turn activation recomputation of every ResBlock and transformer block on or off after construction."""
        self.cfg.use_checkpoint = enabled
        for m in self.modules():
            if isinstance(m, ResBlock):
                m.use_checkpoint = enabled
            elif isinstance(m, BasicTransformerBlock):
                m.checkpoint = enabled

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (N, in_channels, H, W) latents; timesteps: (N,) or a scalar; context: (N, L, context_dim);
        y: (N, adm_in_channels), given exactly when the UNet has `label_emb` (SDXL: see imagic.sdxl)."""
        if (y is None) != (self.cfg.num_classes is None):  # the original asserts the same
            raise ValueError("y must be given exactly when the UNet is vector-conditioned (num_classes set)")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        # The sinusoid is computed in fp32 and then takes the model's dtype (fp16/bf16 weights) as diffusers does.
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        norm, _, conv = self.out  # SiLU fused into the norm
        return conv(norm(h, silu=True))
