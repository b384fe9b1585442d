"""Writing models back in the original single-file LDM layout (the inverse of `load_checkpoint`).

Used for the small model the project trains and ships (weights/shapes) and by tests that round-trip files. The
yaml written beside the checkpoint is an original-style LDM inference config, so other SD tools can read it too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

import torch
import yaml
from torch import nn

from . import detect as D
from .config import ModelConfig, to_ldm_yaml
from .fileio import save_safetensors, save_torch, write_text


def ldm_state_dict(unet: nn.Module, vae: Optional[nn.Module], text_encoder: Optional[nn.Module],
                   cfg: ModelConfig, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """Our modules' state dicts under the original prefixes (model.diffusion_model., first_stage_model., ...)."""
    # SDXL: `text_encoder` is an imagic.sdxl.Conditioner, whose names are the file's under `conditioner.`
    text_prefix = D.CONDITIONER if cfg.text2 is not None else D.TEXT_OPENCLIP if cfg.text.kind == "openclip" \
        else D.TEXT_OPENAI
    sd: Dict[str, torch.Tensor] = {}
    for prefix, module in ((D.UNET, unet), (D.VAE, vae), (text_prefix, text_encoder)):
        if module is None:
            continue
        for k, v in module.state_dict().items():
            v = v.detach() if v.is_meta else v.detach().cpu()
            sd[prefix + k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v.clone()
    return sd


def save_checkpoint(path: Union[str, Path], unet: nn.Module, vae: Optional[nn.Module],
                    text_encoder: Optional[nn.Module], cfg: ModelConfig, dtype: Optional[torch.dtype] = None,
                    write_yaml: bool = True) -> Path:
    """Save as `.safetensors` (or a `{"state_dict": ...}` `.ckpt` when the suffix says so), plus `<name>.yaml`."""
    path = Path(path)
    sd = ldm_state_dict(unet, vae, text_encoder, cfg, dtype)
    if path.suffix == ".ckpt":
        save_torch(path, {"state_dict": sd})
    else:
        save_safetensors(path, sd, {"format": "pt", "imagic_family": cfg.family})
    if write_yaml:
        write_text(path.with_suffix(".yaml"), yaml.safe_dump(to_ldm_yaml(cfg), sort_keys=False))
    return path
