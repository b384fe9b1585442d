"""Imagic's stages 1 and 2 (what `Editor.fit` runs) as functions of a frozen UNet, and the stage-2 weights.

    stage 1  e_opt = argmin_e  L(x0, e; theta)      Adam from e_tgt, model frozen             (paper eq. 2)
    stage 2  theta' = argmin_theta L(x0, e_opt; theta)   e_opt frozen; LoRA or all weights  (paper eq. 3)

L is `steps.denoising_loss`; `training.run_loop` takes the steps (`steps.stage1_step`, `steps.stage2_step`). The
stage-2 weights are either rank-r LoRA adapters (`imagic.lora`) or every UNet weight (`steps.trainable` makes
them trainable); the functions below snapshot them, write and read them (kohya layout for LoRA, so other SD tools
load it) and put them in the UNet for sampling. The run
directory, resuming and stage 3 (interpolation and sampling) are the Editor's (`imagic.editor`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import lora as L
from . import lora_format
from .config import UNetConfig
from .fileio import load_safetensors, save_safetensors
from .samplers import Model
from .schedule import NoiseSchedule
from .settings import FitSettings
from .steps import Device, stage1_step, stage2_step
from .training import LoopState, StepCallback, run_loop


def optimize_embedding(model: Model, schedule: NoiseSchedule, x0: Tensor, e_tgt: Tensor, s: FitSettings,
                       device: Device, *, resume_path: Optional[Path] = None,
                       on_save: Optional[Callable[[LoopState], None]] = None,
                       callback: Optional[StepCallback] = None, progress: bool = True) -> Tuple[Tensor, LoopState]:
    """Stage 1 (eq. 2): Adam on the embedding, started at e_tgt, with the model frozen (`model`: how the loss calls
    the UNet, `steps.unet_call`; on SDXL the packed embedding holds context and pooled, both optimised).
    Returns e_opt and the loop's final state; `resume_path`, `on_save`, `callback` and `progress` go to `run_loop`."""
    e = e_tgt.clone().requires_grad_(True)
    state = run_loop("stage 1: embedding", [e],
                     lambda opt, gen: stage1_step(model, schedule, x0, e, opt, gen, device),
                     steps=s.embed_steps, lr=s.embed_lr, seed=s.seed, save_every=s.save_every,
                     resume_path=resume_path, callback=callback, progress=progress, on_save=on_save)
    return e.detach(), state


def finetune_unet(model: Model, schedule: NoiseSchedule, x0: Tensor, e_opt: Tensor, params: List[Tensor],
                  s: FitSettings, device: Device, *, resume_path: Optional[Path] = None,
                  on_save: Optional[Callable[[LoopState], None]] = None,
                  callback: Optional[StepCallback] = None, progress: bool = True) -> LoopState:
    """Stage 2 (eq. 3): Adam on `params` (from `steps.trainable`) with e_opt frozen, seeded s.seed + 1 (another
    noise stream than stage 1's); `resume_path`, `on_save`, `callback` and `progress` go to `run_loop`."""
    assert s.finetune_steps is not None and s.finetune_lr is not None, "FitSettings.resolved() first"
    return run_loop(f"stage 2: {s.finetune} fine-tune", params,
                    lambda opt, gen: stage2_step(model, schedule, x0, e_opt, params, opt, gen, device),
                    steps=s.finetune_steps, lr=s.finetune_lr, seed=s.seed + 1, save_every=s.save_every,
                    resume_path=resume_path, callback=callback, progress=progress, on_save=on_save)


# --- the stage-2 weights: LoRA adapters or the whole UNet ----------------------------------------------------------
def finetuned_state(unet: nn.Module, mode: str) -> Dict[str, Tensor]:
    """CPU copies of the trained weights: our LoRA state dict (mode "lora") or the full UNet state dict."""
    if mode == "lora":
        return {k: v.detach().cpu().clone() for k, v in lora_format.lora_state_dict(unet).items()}
    return {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}


def save_finetuned(unet: nn.Module, mode: str, path: Path, cfg: UNetConfig, base_sha256: Optional[str]) -> None:
    """Write the trained weights of `unet` (inside `steps.trainable`): LoRA in the kohya layout, which other SD tools
    load, with the base checkpoint's sha256 in its metadata; or the whole UNet."""
    if mode == "lora":
        save_safetensors(path, lora_format.to_kohya(unet, cfg),
                         {"ss_network_module": "networks.lora", "imagic_base_sha256": base_sha256 or ""})
    else:
        save_safetensors(path, {k: v for k, v in unet.state_dict().items()})


def load_finetuned(unet: nn.Module, mode: str, path: Path, cfg: UNetConfig) -> Dict[str, Tensor]:
    """What `save_finetuned` wrote, as `finetuned_state` returns it (a kohya file goes through the model for
    its names); the model is left as it was."""
    tensors = load_safetensors(path)[0]
    if mode == "full":
        return tensors
    lora_format.from_kohya(unet, tensors, cfg)
    try:
        return finetuned_state(unet, "lora")
    finally:
        L.remove_lora(unet)


@contextlib.contextmanager
def finetuned_weights(unet: nn.Module, mode: str, state: Dict[str, Tensor],
                      device: Union[str, torch.device]) -> Iterator[None]:
    """Inside the block `unet` carries `state` (from `finetuned_state`); the base model comes back afterwards."""
    if mode == "lora":
        lora_format.load_lora_state_dict(unet, {k: v.to(device) for k, v in state.items()})
        L.merge_lora(unet)  # sampling is faster merged; remove_lora below restores the base weights
        try:
            yield
        finally:
            L.unmerge_lora(unet)
            L.remove_lora(unet)
        return
    base = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    unet.load_state_dict({k: v.to(device) for k, v in state.items()})
    try:
        yield
    finally:
        unet.load_state_dict(base)
