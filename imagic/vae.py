"""The Stable Diffusion VAE: `AutoencoderKL` with its convolutional `Encoder` and `Decoder`.

A port of ldm/models/autoencoder.py (`AutoencoderKL`, `DiagonalGaussianDistribution` from
ldm/modules/distributions/distributions.py) and ldm/modules/diffusionmodules/model.py (`Encoder`, `Decoder`,
`ResnetBlock`, `AttnBlock`, `Downsample`, `Upsample`). Attribute names are the original ones, so a checkpoint's
`first_stage_model.*` tensors load with `load_state_dict(strict=True)` after removing the prefix.

Images are in [-1, 1]; latents are the posterior's mean or a sample, *unscaled*. The diffusion model works on
`latents * scale_factor` (0.18215 for SD), which `encode_latents` / `decode_latents` apply.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from imagic.config import VAEConfig
from imagic.kernels import attention, group_norm


class Normalize(nn.GroupNorm):
    """ldm's `Normalize`: GroupNorm(32, C, eps=1e-6, affine), optionally fused with the SiLU that follows it.

    A GroupNorm subclass so the checkpoint keys stay `weight`/`bias`; statistics are computed in fp32.
    """

    def __init__(self, channels: int, silu: bool = False):
        super().__init__(num_groups=32, num_channels=channels, eps=1e-6, affine=True)
        self.silu = silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=self.silu)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice plus a residual; a 1x1 `nin_shortcut` when the channel count changes.

    The VAE has no timestep embedding (temb_channels=0 in the original), so there is no `temb_proj`.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels, silu=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = Normalize(out_channels, silu=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.dropout(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, C channels wide, with 1x1 convs as projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1 head, HW, C)
            return t.reshape(b, c, hgt * wid).transpose(1, 2).unsqueeze(1)

        out = attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))  # scale C^-1/2, as the original
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, hgt, wid)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom only: (0, 1, 0, 1), conv padding 0 (not symmetric)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level (the original's anonymous `nn.Module()` holding `block`, `attn` and a resampler)."""

    def __init__(self, blocks: list, attns: list):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:  # attention follows every block of a level listed in attn_resolutions
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    """ResnetBlock, attention, ResnetBlock at the lowest resolution (always present, whatever attn_resolutions)."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f) with f = 2^(len(ch_mult)-1)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, kernel_size=3, padding=1)
        in_ch_mult = (1,) + tuple(cfg.ch_mult)
        curr_res = cfg.resolution
        self.down = nn.ModuleList()
        for i_level, mult in enumerate(cfg.ch_mult):
            block_in, block_out = cfg.ch * in_ch_mult[i_level], cfg.ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i_level != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, cfg.dropout)
        self.norm_out = Normalize(block_in, silu=True)
        z_out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = nn.Conv2d(block_in, z_out, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(self.norm_out(self.mid(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f).

    `up[i]` is the level at resolution i (0 = full size), built from the lowest resolution upwards and inserted at
    the front, exactly as the original, so checkpoint indices match; the forward pass walks it in reverse.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        curr_res = cfg.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = _Mid(block_in, cfg.dropout)
        self.up = nn.ModuleList()
        for i_level in reversed(range(n)):
            block_out = cfg.ch * cfg.ch_mult[i_level]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i_level != 0:
                level.upsample = Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, level)
        self.norm_out = Normalize(block_in, silu=True)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(self.norm_out(h))


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)); logvar is clamped to [-30, 20] as in the original."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """Encoder + `quant_conv` to the posterior's moments; `post_quant_conv` + Decoder back to pixels.

    Runs in its own parameter dtype whatever the inputs' dtype and with autocast disabled: SD pipelines keep the
    VAE in fp32 while the UNet runs in half precision, because the fp16 VAE overflows to NaN on some images.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        if not cfg.double_z:
            raise ValueError("AutoencoderKL needs double_z=True (the encoder predicts mean and log-variance)")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, kernel_size=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images in [-1, 1], (B, 3, H, W) with H, W multiples of the downsampling factor -> posterior."""
        with torch.autocast(x.device.type, enabled=False):
            return DiagonalGaussian(self.quant_conv(self.encoder(x.to(self.dtype))))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, embed_dim, h, w) -> images, roughly in [-1, 1] (not clamped), in the VAE's dtype."""
        with torch.autocast(z.device.type, enabled=False):
            return self.decoder(self.post_quant_conv(z.to(self.dtype)))


def encode_latents(vae: AutoencoderKL, images: torch.Tensor, scale_factor: float,
                   generator: Optional[torch.Generator] = None, sample: bool = True) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents the UNet works on (a posterior sample, or its mean if sample=False)."""
    posterior = vae.encode(images)
    z = posterior.sample(generator) if sample else posterior.mode()
    return z * scale_factor


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] (the inverse scaling of encode_latents, then the decoder)."""
    return vae.decode(latents / scale_factor)
