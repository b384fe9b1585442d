"""`load_checkpoint`: a single-file SD checkpoint in, our UNet, VAE, text encoder and tokenizer out.

Because our module names are the checkpoint's keys, loading a part is a prefix split followed by a strict
`load_state_dict`. Models are built on the `meta` device and the file's tensors are assigned to them, so a 4 GB
checkpoint costs its own size in memory once, not twice, and no time is spent on random initialisation.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn

from . import detect as D
from .assemble import StableDiffusion, build, check_keys, meta_model
from .checkpoint import CheckpointError, PathLike, StateDict, read_state_dict
from .config import ConfigError, ModelConfig, describe, from_ldm_yaml

log = logging.getLogger(__name__)

ConfigLike = Union[None, str, Path, Dict[str, Any], ModelConfig]


def _resolve_config(path: Path, config: ConfigLike, evidence: List[str]) -> Optional[ModelConfig]:
    """An explicit config, else `<checkpoint>.yaml` beside the file (as other SD tools do), else None."""
    if isinstance(config, ModelConfig):
        evidence.append("config given by the caller (overrides detection)")
        return config
    if config is None:
        beside = path.with_suffix(".yaml")
        if not beside.is_file():
            return None
        config = beside
    try:
        cfg = from_ldm_yaml(config)
    except ConfigError as e:
        raise CheckpointError(f"config {config if not isinstance(config, dict) else '(dict)'}: {e}") from None
    evidence.append(f"config from {config if not isinstance(config, dict) else 'a yaml dict'} "
                    f"(overrides detection; parameterization {cfg.prediction_type})")
    return cfg


def _text_prefix(sd: StateDict, cfg: ModelConfig) -> tuple:
    """(file prefix, prefix our module expects). Older SD1 files lack `text_model.`; we add it back. SDXL's
    two towers load together as imagic.sdxl.Conditioner, whose names are the file's under `conditioner.`."""
    if cfg.text2 is not None:
        return D.CONDITIONER, ""
    if cfg.text.kind == "openclip":
        return D.TEXT_OPENCLIP, ""
    has_tm = any(k.startswith(D.TEXT_OPENAI + "text_model.") for k in sd)
    return (D.TEXT_OPENAI, "") if has_tm else (D.TEXT_OPENAI, "text_model.")


def _split(sd: StateDict, prefix: str, add: str = "", use_ema: bool = False) -> StateDict:
    return {add + k[len(prefix):]: v for k, v in sd.items()
            if k.startswith(prefix) and not D.is_skipped(k, use_ema)}


def _ema_unet(sd: StateDict, path: Path) -> StateDict:
    """Swap the UNet's weights for their EMA copies (`model_ema.*`)."""
    out = dict(sd)
    missing = []
    for k in sd:
        if k.startswith(D.UNET):
            e = D.ema_key(k)
            if e in sd:
                out[k] = sd[e]
            else:
                missing.append(k)
    if missing:
        raise CheckpointError(f"{path}: EMA weights incomplete ({len(missing)} UNet tensors lack a model_ema copy, "
                              f"e.g. {missing[0]})")
    return out


def _read_and_configure(path: Path, config: ConfigLike) -> tuple:
    """Read the file, detect what it is, apply a yaml/config override. Also says whether epsilon-vs-v is known."""
    sd = read_state_dict(path)
    det = D.detect(sd)
    evidence = list(det.evidence)
    cfg = _resolve_config(path, config, evidence)
    prediction_known = cfg is not None or det.prediction_known
    return sd, det, cfg or det.config, evidence, prediction_known


def _probe_prediction(unet: nn.Module, cfg: ModelConfig, evidence: List[str]) -> None:
    """Settle epsilon vs v by the UNet's behaviour (detect.probe_v_prediction) and record why."""
    is_v, score = D.probe_v_prediction(unet, cfg.unet.context_dim)
    cfg.prediction_type = "v" if is_v else "epsilon"
    if is_v:
        cfg.family, cfg.image_size = "sd2-v", 768
    evidence.append(f"prediction type {cfg.prediction_type}: probe mean(unet(0.5, t=999) - x) = {score:.3f} "
                    f"({'<' if is_v else '>='} -1, the A1111 test); pass the yaml to override")


def _text_factory(cfg: ModelConfig) -> Callable[[], nn.Module]:
    """The text encoder to build: SD 1.x/2.x's one tower, or SDXL's Conditioner holding both."""
    from .clip import build_text_encoder
    from .sdxl import Conditioner

    return (lambda: Conditioner(cfg)) if cfg.text2 is not None else (lambda: build_text_encoder(cfg.text))


def load_checkpoint(path: PathLike, config: ConfigLike = None, dtype: torch.dtype = torch.float32,
                    device: Union[str, torch.device] = "cpu", use_ema: bool = False,
                    vae_dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """Load a single-file SD 1.x / 2.x / XL checkpoint (`.safetensors` or `.ckpt`).

    For SDXL, `.text_encoder` is an imagic.sdxl.Conditioner (both towers; `(ids, ids2) -> (context, pooled)`)
    and `.tokenizer2` the bigG tower's tokenizer.

    config: an original LDM inference yaml (path or dict) or a ModelConfig; by default `<checkpoint>.yaml` beside
        the file if present, else the family and sizes are detected from keys and shapes.
    dtype: for the UNet and text encoder; the VAE uses `vae_dtype` (fp32 by default: fp16 VAE decodes can NaN).
    use_ema: take the UNet's EMA weights (`model_ema.*`) when the file has them.
    """
    # Imported here so `imagic.config` / `imagic.checkpoint` stay importable on their own.
    from .tokenizer import Tokenizer
    from .unet import UNetModel
    from .vae import AutoencoderKL

    path = Path(path)
    device = torch.device(device)
    if path.is_dir():  # a diffusers model folder (unet/, vae/, text_encoder/, ...): imagic/diffusers_format.py
        from .diffusers_format import load_diffusers_folder
        return load_diffusers_folder(path, dtype, device, vae_dtype)
    sd, det, cfg, evidence, prediction_known = _read_and_configure(path, config)
    if use_ema:
        if det.has_ema:
            sd = _ema_unet(sd, path)
            evidence.append("using the EMA UNet weights")
        else:
            warnings.warn(f"{path.name}: no EMA weights in this file (pruned files often hold EMA weights already); "
                          "using the weights it has", stacklevel=2)
    unet = build(lambda: UNetModel(cfg.unet), _split(sd, D.UNET), "UNet", dtype, device)
    vae = text = tokenizer = tokenizer2 = None
    if det.has_vae:
        vae = build(lambda: AutoencoderKL(cfg.vae), _split(sd, D.VAE), "VAE", vae_dtype, device)
    else:
        warnings.warn(f"{path.name}: no VAE in this file (first_stage_model.*); .vae is None", stacklevel=2)
    if det.has_text:
        src, add = _text_prefix(sd, cfg)
        text = build(_text_factory(cfg), _split(sd, src, add), "text encoder", dtype, device)
        tokenizer = Tokenizer.for_text_config(cfg.text)
        tokenizer2 = Tokenizer.for_text_config(cfg.text2) if cfg.text2 is not None else None
    else:
        warnings.warn(f"{path.name}: no text encoder in this file (cond_stage_model.* / conditioner.*); "
                      ".text_encoder is None", stacklevel=2)
    if not prediction_known:
        _probe_prediction(unet, cfg, evidence)
    log.info("loaded %s: %s", path.name, describe(cfg))
    return StableDiffusion(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, config=cfg,
                           evidence=evidence, path=path, tokenizer2=tokenizer2)


def inspect_checkpoint(path: PathLike, config: ConfigLike = None, probe: bool = True) -> Dict[str, Any]:
    """What `imagic inspect` shows: family, prediction type and evidence, EMA, dtypes, sizes, unknown keys.

    Every component's key set is compared with our models built on the meta device, so a file that would not
    load is reported here with the same message `load_checkpoint` would give.
    """
    from .unet import UNetModel
    from .vae import AutoencoderKL

    path = Path(path)
    sd, det, cfg, evidence, prediction_known = _read_and_configure(path, config)
    parts = {"unet": (D.UNET, "", lambda: UNetModel(cfg.unet), det.has_unet),
             "vae": (D.VAE, "", lambda: AutoencoderKL(cfg.vae), det.has_vae)}
    if det.has_text:
        src, add = _text_prefix(sd, cfg)
        parts["text_encoder"] = (src, add, _text_factory(cfg), True)
    problems, dtypes = [], {}
    for name, (prefix, add, factory, present) in parts.items():
        part = _split(sd, prefix, add)
        dtypes[name] = sorted({str(v.dtype).removeprefix("torch.") for v in part.values()})
        if present:
            try:
                check_keys(meta_model(factory, name), part, name)
            except CheckpointError as e:
                problems.append(str(e))
    known = (D.UNET, D.VAE, "cond_stage_model.", D.CONDITIONER, D.EMA)
    unknown = sorted(k for k in sd if not k.startswith(known) and not D.is_skipped(k, True))
    if not prediction_known and probe and not problems:
        unet = build(lambda: UNetModel(cfg.unet), _split(sd, D.UNET), "UNet", torch.float32, torch.device("cpu"))
        _probe_prediction(unet, cfg, evidence)
        prediction_known = True
    return {
        "path": str(path), "family": cfg.family,
        "prediction_type": cfg.prediction_type if prediction_known else "unknown (probe skipped)",
        "native_resolution": cfg.image_size, "evidence": evidence, "ema": det.has_ema,
        "components": {"unet": det.has_unet, "vae": det.has_vae, "text_encoder": det.has_text},
        "dtypes": dtypes, "parameters": D.count_params(sd), "unknown_keys": unknown, "problems": problems,
        "config": cfg.to_dict(),
    }
