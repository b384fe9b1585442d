"""LoRA files: kohya's format, which other SD tools load and write, and our own round-trip state dict.

Ours names each LoRA by its module path (`input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight`,
`.lora_up.weight`, a 0-dim `.alpha`). The layers themselves and their injection are `imagic.lora`.

kohya format: SD 1.x/2.x LoRA files name modules by the *diffusers* UNet
(`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`, `.lora_up.weight`,
`.alpha`), because sd-scripts trains those models on a diffusers-layout UNet. Our modules have the LDM names, so
`transformer_paths` rebuilds the block loop of `openaimodel.UNetModel` to map each SpatialTransformer
(`input_blocks.1.1`) to its diffusers parent (`down_blocks.0.attentions.0`) with the index arithmetic of
diffusers' `convert_ldm_unet_checkpoint`; everything below a transformer has the same names in both.
SDXL LoRA files name modules by the *original* sgm path (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`),
because sd-scripts trains SDXL on its own copy of the sgm UNet (`sdxl_original_unet.py`); that path is ours.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from .config import UNetConfig
from .lora import LoRAModule, lora_modules, set_lora

_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


def lora_state_dict(unet: nn.Module) -> Dict[str, torch.Tensor]:
    """Our own format: `<module path>.lora_down.weight`, `.lora_up.weight` and a 0-dim `.alpha`, fp32."""
    sd: Dict[str, torch.Tensor] = {}
    for path, m in lora_modules(unet):
        sd.update(_entry(path, m, torch.float32))
    return sd


def load_lora_state_dict(unet: nn.Module, sd: Dict[str, torch.Tensor]) -> List[str]:
    """Load lora_state_dict() output, adding LoRA layers (rank from the shapes) where there are none yet."""
    return _load(unet, _group(sd))


def transformer_paths(cfg: UNetConfig) -> Dict[str, str]:
    """LDM path of every SpatialTransformer -> its diffusers path, e.g. input_blocks.1.1 -> down_blocks.0.attentions.0.

    The loop is UNetModel.__init__'s (openaimodel.py): input block n = 1 + level * (num_res_blocks + 1) + i holds
    down_blocks.level's i-th attention, output block n = up * (num_res_blocks + 1) + i holds up_blocks.up's,
    with `up` counting levels from the bottom (diffusers' convert_ldm_unet_checkpoint).
    """
    paths: Dict[str, str] = {}
    levels, per_level = len(cfg.channel_mult), cfg.num_res_blocks + 1
    ds = 1
    for level in range(levels):
        for i in range(cfg.num_res_blocks):
            if ds in cfg.attention_resolutions:
                paths[f"input_blocks.{1 + level * per_level + i}.1"] = f"down_blocks.{level}.attentions.{i}"
        if level != levels - 1:
            ds *= 2
    paths["middle_block.1"] = "mid_block.attentions.0"
    for up in range(levels):
        for i in range(per_level):
            if ds in cfg.attention_resolutions:
                paths[f"output_blocks.{up * per_level + i}.1"] = f"up_blocks.{up}.attentions.{i}"
        ds //= 2
    return paths


def diffusers_path(path: str, cfg: UNetConfig) -> str:
    """The diffusers UNet2DConditionModel path of one of our modules inside a SpatialTransformer."""
    for ldm, diff in transformer_paths(cfg).items():
        if path == ldm or path.startswith(ldm + "."):
            return diff + path[len(ldm):]
    raise ValueError(f"{path} is not inside a SpatialTransformer; the kohya names of other layers are not mapped")


def kohya_name(path: str, cfg: UNetConfig) -> str:
    """`lora_unet_` + a module path with '.' -> '_' (sd-scripts' LoRANetwork naming): the diffusers path for
    SD 1.x/2.x, our own (sgm) path for SDXL, each as sd-scripts names the UNet it trains."""
    diffusers = diffusers_path(path, cfg)  # also for SDXL: it refuses the layers outside a transformer
    return "lora_unet_" + (path if _sgm_named(cfg) else diffusers).replace(".", "_")


def _sgm_named(cfg: UNetConfig) -> bool:
    """SDXL, told apart by its vector conditioning (label_emb): the one family sd-scripts trains on the sgm UNet."""
    return cfg.num_classes == "sequential"


def to_kohya(unet: nn.Module, cfg: Optional[UNetConfig] = None,
             dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """The LoRA in the kohya format other SD tools load (save it with safetensors.torch.save_file).

    `cfg` defaults to the model's own `unet.cfg`. Linear weights are 2-D, 1x1 conv weights 4-D (out, in, 1, 1).
    """
    cfg = _config(unet, cfg)
    sd: Dict[str, torch.Tensor] = {}
    for path, m in lora_modules(unet):
        sd.update(_entry(kohya_name(path, cfg), m, dtype))
    return sd


def from_kohya(unet: nn.Module, sd: Dict[str, torch.Tensor], cfg: Optional[UNetConfig] = None) -> List[str]:
    """Load a kohya-format UNet LoRA into our LDM-named model (adding LoRA layers where needed); returns paths.

    Text-encoder entries (`lora_te*`, `lora_te1_*`, `lora_te2_*`) are skipped with a warning; anything else that
    is not a plain LoRA on a module of this UNet is an error that lists the names. For SDXL the diffusers-path names
    are accepted too: diffusers' `convert_state_dict_to_kohya` writes those for a LoRA trained on its SDXL UNet.
    """
    cfg = _config(unet, cfg)
    te = [k for k in sd if k.startswith("lora_te")]
    if te:
        warnings.warn(f"skipping {len(te)} text-encoder LoRA tensors (lora_te*): only the UNet LoRA is loaded")
    entries = _group({k: v for k, v in sd.items() if not k.startswith("lora_te")})
    paths = [p for p, _ in unet.named_modules() if _inside_transformer(p, cfg)]
    names = {kohya_name(p, cfg): p for p in paths}
    if _sgm_named(cfg):
        names.update({"lora_unet_" + diffusers_path(p, cfg).replace(".", "_"): p for p in paths})
    unknown = sorted(set(entries) - set(names))
    if unknown:
        raise ValueError(f"kohya LoRA names that match no module of this UNet: {', '.join(unknown)}")
    return _load(unet, {names[n]: tensors for n, tensors in entries.items()})


def _inside_transformer(path: str, cfg: UNetConfig) -> bool:
    return any(path.startswith(ldm + ".") for ldm in transformer_paths(cfg))


def _config(unet: nn.Module, cfg: Optional[UNetConfig]) -> UNetConfig:
    cfg = cfg if cfg is not None else getattr(unet, "cfg", None)
    if not isinstance(cfg, UNetConfig):
        raise TypeError("the kohya names need the UNetConfig: pass cfg= (the model has no `cfg` attribute)")
    return cfg


def _entry(name: str, m: LoRAModule, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": m.lora_down.weight.detach().to(dtype).clone(),
            f"{name}.lora_up.weight": m.lora_up.weight.detach().to(dtype).clone(),
            f"{name}.alpha": torch.tensor(m.alpha, dtype=dtype)}


def _group(sd: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    """{name: {"lora_down.weight": .., "lora_up.weight": .., "alpha": ..}}; other suffixes or missing halves fail."""
    entries: Dict[str, Dict[str, torch.Tensor]] = {}
    bad = []
    for key, value in sd.items():
        suffix = next((s for s in _SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            bad.append(key)
        else:
            entries.setdefault(key[:-len(suffix) - 1], {})[suffix] = value
    if bad:
        raise ValueError(f"not plain LoRA tensors (LoCon/LoHa/DoRA are not supported): {', '.join(sorted(bad))}")
    incomplete = sorted(n for n, e in entries.items() if not {"lora_down.weight", "lora_up.weight"} <= set(e))
    if incomplete:
        raise ValueError(f"LoRA entries without both lora_down and lora_up: {', '.join(incomplete)}")
    return entries


def _load(unet: nn.Module, entries: Dict[str, Dict[str, torch.Tensor]]) -> List[str]:
    """Copy each entry into the LoRA at its path (see `set_lora`). A missing alpha means alpha = rank (kohya's
    convention), i.e. scale 1."""
    for path, e in entries.items():
        set_lora(unet, path, e["lora_down.weight"], e["lora_up.weight"], float(e["alpha"]) if "alpha" in e else None)
    return list(entries)
