"""Tiny SD-shaped models for fast CPU tests: same structure and names as SD 1.x / 2.x, small widths.

Sizes follow each family's conventions (SD1: 8 heads, conv proj_in, CLIP names; SD2: 64 channels per head, linear
proj_in, OpenCLIP names), so detection from shapes alone must reproduce these configs exactly.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from imagic.config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from tests.helpers import randomize_


def tiny_config(family: str = "sd1") -> ModelConfig:
    vae = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4)
    if family == "sdxl":
        return tiny_sdxl_config(vae)
    if family == "sd1":
        unet = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_res_blocks=1,
                          num_heads=8, context_dim=64)
        text = TextConfig(kind="openai", width=64, layers=2, heads=1, mlp_width=128, projection_dim=64)
        return ModelConfig(family="sd1", image_size=32, unet=unet, vae=vae, text=text)
    unet = UNetConfig(model_channels=64, channel_mult=(1, 2), attention_resolutions=(2,), num_res_blocks=1,
                      num_heads=-1, num_head_channels=64, context_dim=64, use_linear_in_transformer=True)
    text = TextConfig(kind="openclip", width=64, layers=3, heads=1, mlp_width=128, projection_dim=32, act="gelu",
                      layer="penultimate")
    v = family == "sd2-v"
    return ModelConfig(family=family, prediction_type="v" if v else "epsilon", image_size=32, unet=unet, vae=vae,
                       text=text)


def tiny_sdxl_config(vae: VAEConfig) -> ModelConfig:
    """SDXL's structure at widths whose conventions detection reads back: 64-channel heads in the UNet and the
    towers, per-level depth (1, 1, 2), no attention at the first level, y = pooled 32 + 6 x 8. A loaded SDXL file
    says 1024 px (sgm's yaml has no image size); tests edit at 32 (`Editor(resolution=32)`, `--resolution 32`)."""
    unet = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), attention_resolutions=(4, 2), num_res_blocks=1,
                      num_heads=-1, num_head_channels=64, transformer_depth=(1, 1, 2), context_dim=128,
                      use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=32 + 6 * 8)
    text = TextConfig(kind="openai", width=64, layers=2, heads=1, mlp_width=128, projection_dim=64,
                      layer="penultimate", final_norm=False)
    text2 = TextConfig(kind="openclip", width=64, layers=3, heads=1, mlp_width=128, projection_dim=32, act="gelu",
                       layer="penultimate", final_norm=False)
    return ModelConfig(family="sdxl", scale_factor=0.13025, image_size=1024, unet=unet, vae=vae, text=text,
                       text2=text2)


def tiny_models(cfg: ModelConfig, seed: int = 0):
    from imagic.clip import build_text_encoder
    from imagic.sdxl import Conditioner
    from imagic.unet import UNetModel
    from imagic.vae import AutoencoderKL

    torch.manual_seed(seed)
    unet = randomize_(UNetModel(cfg.unet), seed).eval()
    vae = randomize_(AutoencoderKL(cfg.vae), seed + 1).eval()
    text = randomize_(Conditioner(cfg) if cfg.text2 is not None else build_text_encoder(cfg.text), seed + 2).eval()
    return unet, vae, text


def write_tiny_checkpoint(path: Path, family: str = "sd1", seed: int = 0, dtype: Optional[torch.dtype] = None,
                          write_yaml: bool = True, cfg: Optional[ModelConfig] = None) -> Path:
    from imagic.export import save_checkpoint

    cfg = cfg or tiny_config(family)
    unet, vae, text = tiny_models(cfg, seed)
    return save_checkpoint(path, unet, vae, text, cfg, dtype=dtype, write_yaml=write_yaml)


def replace(cfg, **kw):
    return dataclasses.replace(cfg, **kw)
