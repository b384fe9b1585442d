"""Model assembly shared by the two checkpoint readers (`loader.py` for single files, `diffusers_format.py` for
diffusers folders): build a model on the `meta` device, check the file's keys and shapes against it strictly, then
assign the file's tensors, and the `StableDiffusion` bundle of the parts."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import torch
from torch import nn

from .checkpoint import CheckpointError, StateDict
from .config import ModelConfig, describe


@dataclass
class StableDiffusion:
    """The parts of a loaded checkpoint. A part absent from the file is None (with a warning at load time)."""

    unet: Optional[nn.Module]
    vae: Optional[nn.Module]
    text_encoder: Optional[nn.Module]
    tokenizer: Any
    config: ModelConfig
    evidence: List[str] = field(default_factory=list)
    path: Optional[Path] = None
    tokenizer2: Any = None  # SDXL: the second (OpenCLIP bigG) tower's tokenizer; `text_encoder` holds both towers

    def __repr__(self) -> str:
        return f"StableDiffusion({describe(self.config)}, from {self.path})"


def check_keys(model: nn.Module, part: StateDict, name: str) -> None:
    """Strict loading with a message that lists what is wrong (first few of each kind)."""
    reference = model.state_dict()  # meta tensors: shapes and dtypes, no data
    expected = {k: tuple(v.shape) for k, v in reference.items()}
    missing = sorted(set(expected) - set(part))
    unexpected = sorted(set(part) - set(expected))
    shapes = sorted(f"{k} {tuple(part[k].shape)} != {expected[k]}" for k in set(part) & set(expected)
                    if tuple(part[k].shape) != expected[k])
    dtypes = sorted(f"{k} {str(part[k].dtype).removeprefix('torch.')}" for k in set(part) & set(expected)
                    if reference[k].is_floating_point() and not part[k].is_floating_point())
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes),
                         ("not floating point", dtypes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
    if problems:
        raise CheckpointError(f"{name} does not match the expected architecture: " + "; ".join(problems) +
                              " — pass the model's original yaml with --config if it is a non-standard size")


def meta_model(factory, name: str) -> nn.Module:
    """The model on the meta device. Sizes read from a file or a yaml can be consistent field by field and still
    not make a model (channels not divisible by GroupNorm's 32 groups, heads that do not divide a width)."""
    try:
        with torch.device("meta"):
            return factory()
    except (ValueError, AssertionError, ZeroDivisionError, RuntimeError) as e:
        raise CheckpointError(f"{name}: the sizes found for it do not make a model ({' '.join(str(e).split())}) "
                              "— pass the model's original yaml with --config") from None


def build(factory, part: StateDict, name: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Build on meta, check keys and shapes, then assign the file's tensors (cast to dtype, moved to device)."""
    model = meta_model(factory, name)
    check_keys(model, part, name)
    cast = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in part.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    _materialize_derived_buffers(model, factory, device)
    return model.eval().requires_grad_(False)


def _materialize_derived_buffers(model: nn.Module, factory, device: torch.device) -> None:
    """Non-persistent buffers (causal masks, position ids) are not in the file: take them from a CPU build."""
    if not any(b.is_meta for b in model.buffers()):
        return
    with torch.device("cpu"):
        reference = dict(factory().named_buffers())
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            owner._buffers[leaf] = reference[name].to(device)
