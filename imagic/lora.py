"""LoRA for the UNet (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): the layers and
their injection into a model. The file formats (kohya's and our own) are `imagic.lora_format`.

A wrapped layer computes `W x + b + scale * up(down(x))` with `scale = alpha / rank`. `down` starts
kaiming-uniform and `up` starts at zero (as in the paper and kohya's sd-scripts `networks/lora.py`), so an
injected model is exactly the base model until the first optimizer step.

The wrappers subclass `nn.Linear` / `nn.Conv2d` and adopt the base layer's own `weight`/`bias` Parameters, so
base keys keep their checkpoint names (`...attn1.to_q.weight`) and the LoRA matrices add
`...to_q.lora_down.weight` / `...to_q.lora_up.weight` next to them.

Precision: the LoRA matrices are trainable and always stored in fp32 (fp32 master weights and optimizer state),
whatever the base dtype. In the forward they are cast to the activation's dtype, which is what autocast would
do and what the frozen base layer runs in: upcasting the (tokens x channels) activations to fp32 instead would
store an fp32 copy of every LoRA layer's input for the backward, for no gain at rank 4. `merge()` forms the
delta in fp32 and rounds once into the base dtype.
"""
from __future__ import annotations

import math
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .settings import FitSettings

# kohya's default for the UNet: every Linear / 1x1 Conv2d inside a SpatialTransformer (diffusers'
# Transformer2DModel). Matched against the last components of a module path.
DEFAULT_TARGETS: Tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


class _LoRAMixin:
    """What LoRALinear and LoRAConv2d share: init, the scaled delta, merge/unmerge."""

    weight: nn.Parameter
    lora_down: nn.Module
    lora_up: nn.Module

    def _init_lora(self, rank: int, alpha: Optional[float]) -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.merged = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @torch.no_grad()
    def reset_lora_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """kohya / the LoRA paper: down ~ kaiming-uniform(a=sqrt(5)) (nn.Linear's default), up = 0.

        Drawn on the CPU (from `generator` when given) and copied, so a seeded init is the same on any device."""
        if self.lora_down.weight.is_meta:
            return
        w = torch.empty(self.lora_down.weight.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
        self.lora_down.weight.copy_(w)
        nn.init.zeros_(self.lora_up.weight)

    def _adopt(self, base: nn.Module) -> "_LoRAMixin":
        """Take over `base`'s Parameters (same objects: names, dtype, device and memory unchanged)."""
        self.weight, self.bias = base.weight, base.bias
        self.lora_down.to_empty(device=base.weight.device)
        self.lora_up.to_empty(device=base.weight.device)
        self.reset_lora_parameters()
        self.train(base.training)
        return self

    def delta(self) -> torch.Tensor:
        """scale * up @ down in fp32, shaped like the base weight: what merge() adds."""
        up = self.lora_up.weight.float().flatten(1)
        down = self.lora_down.weight.float().flatten(1)
        return (self.scale * (up @ down)).view(self.weight.shape)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the LoRA into the base weight (for faster sampling or export); forward then skips the branch.

        The pre-merge weight is kept (a non-persistent buffer) so unmerge() restores it bit-exactly: rounding
        W + delta into the weight dtype loses low bits of W, so subtracting any stored delta could not.
        """
        if self.merged:
            return
        self.register_buffer("weight_before_merge", self.weight.detach().clone(), persistent=False)
        self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before merge()."""
        if not self.merged:
            return
        self.weight.copy_(self.weight_before_merge)
        del self.weight_before_merge
        self.merged = False

    def _add_lora(self, x: torch.Tensor, out: torch.Tensor, op) -> torch.Tensor:
        """out + scale * up(down(x)) with `op` = F.linear or F.conv2d; nothing to add once merged."""
        if self.merged:
            return out
        down, up = self.lora_down.weight.to(x.dtype), self.lora_up.weight.to(x.dtype)
        return out + op(op(x, down), up) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


class LoRALinear(_LoRAMixin, nn.Linear):
    """nn.Linear + scale * lora_up(lora_down(x)); lora_down: in -> rank, lora_up: rank -> out, both without bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = FitSettings.lora_rank,
                 alpha: Optional[float] = None, device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_lora(rank, alpha)
        self.lora_down = nn.Linear(in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_up = nn.Linear(rank, out_features, bias=False, device=device, dtype=torch.float32)
        self.reset_lora_parameters()

    @classmethod
    def from_base(cls, base: nn.Linear, rank: int = FitSettings.lora_rank, alpha: Optional[float] = None) -> "LoRALinear":
        new = cls(base.in_features, base.out_features, base.bias is not None, rank, alpha,
                  device="meta", dtype=base.weight.dtype)
        return new._adopt(base)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_lora(x, super().forward(x), F.linear)


class LoRAConv2d(_LoRAMixin, nn.Conv2d):
    """A 1x1 nn.Conv2d (SD1's proj_in/proj_out) + scale * lora_up(lora_down(x)), both 1x1 convs without bias."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, rank: int = FitSettings.lora_rank,
                 alpha: Optional[float] = None, device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__(in_channels, out_channels, 1, bias=bias, device=device, dtype=dtype)
        self._init_lora(rank, alpha)
        self.lora_down = nn.Conv2d(in_channels, rank, 1, bias=False, device=device, dtype=torch.float32)
        self.lora_up = nn.Conv2d(rank, out_channels, 1, bias=False, device=device, dtype=torch.float32)
        self.reset_lora_parameters()

    @classmethod
    def from_base(cls, base: nn.Conv2d, rank: int = FitSettings.lora_rank, alpha: Optional[float] = None) -> "LoRAConv2d":
        if not _is_pointwise(base):
            raise TypeError(f"LoRAConv2d wraps plain 1x1 convolutions only, got {base}")
        new = cls(base.in_channels, base.out_channels, base.bias is not None, rank, alpha,
                  device="meta", dtype=base.weight.dtype)
        return new._adopt(base)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_lora(x, super().forward(x), F.conv2d)


LoRAModule = Union[LoRALinear, LoRAConv2d]


def _is_pointwise(m: nn.Conv2d) -> bool:
    return (m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0) and m.dilation == (1, 1)
            and m.groups == 1)


def _wrap(module: nn.Module, path: str, rank: int, alpha: Optional[float]) -> LoRAModule:
    if isinstance(module, (LoRALinear, LoRAConv2d)):
        raise ValueError(f"{path} already has a LoRA; remove_lora() first")
    if isinstance(module, nn.Linear):
        return LoRALinear.from_base(module, rank, alpha)
    if isinstance(module, nn.Conv2d) and _is_pointwise(module):
        return LoRAConv2d.from_base(module, rank, alpha)
    raise TypeError(f"cannot add a LoRA to {path} ({module}): only nn.Linear and 1x1 nn.Conv2d are supported")


def _unwrap(m: LoRAModule) -> nn.Module:
    """A plain layer holding m's (merged or not) weight and bias Parameters."""
    if isinstance(m, LoRALinear):
        plain: nn.Module = nn.Linear(m.in_features, m.out_features, m.bias is not None, device="meta")
    else:
        plain = nn.Conv2d(m.in_channels, m.out_channels, 1, bias=m.bias is not None, device="meta")
    plain.weight, plain.bias = m.weight, m.bias
    return plain.train(m.training)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _matches(path: str, targets: Sequence[str]) -> bool:
    parts = path.split(".")
    return any(parts[-len(t.split(".")):] == t.split(".") for t in targets)


def lora_modules(unet: nn.Module) -> Iterator[Tuple[str, LoRAModule]]:
    """(path, module) of every LoRA layer, in module order."""
    for path, m in unet.named_modules():
        if isinstance(m, (LoRALinear, LoRAConv2d)):
            yield path, m


def inject_lora(unet: nn.Module, rank: int = FitSettings.lora_rank, alpha: Optional[float] = None,
                targets: Sequence[str] = DEFAULT_TARGETS, seed: Optional[int] = None) -> List[str]:
    """Replace every module whose path ends with one of `targets` by its LoRA wrapper; returns their paths.

    The whole model is frozen (`requires_grad_(False)`) and only the new LoRA matrices train, as in kohya's
    trainer. `seed` makes the random init of `lora_down` reproducible on any device. Convert the model's
    dtype/device before injecting: a later `.half()` would also cast the LoRA.
    """
    paths = [p for p, _ in unet.named_modules() if p and _matches(p, targets)]
    if not paths:
        raise ValueError(f"no module of {type(unet).__name__} matches the LoRA targets {list(targets)}")
    unet.requires_grad_(False)
    for path in paths:
        _set_module(unet, path, _wrap(unet.get_submodule(path), path, rank, alpha))
    if seed is not None:  # a reproducible init: one CPU generator, modules in order
        gen = torch.Generator().manual_seed(seed)
        for path in paths:
            unet.get_submodule(path).reset_lora_parameters(gen)
    return paths


def lora_parameters(unet: nn.Module) -> List[nn.Parameter]:
    """The trainable LoRA matrices (what the optimizer gets)."""
    return [p for _, m in lora_modules(unet) for p in (m.lora_down.weight, m.lora_up.weight)]


def merge_lora(unet: nn.Module) -> None:
    for _, m in lora_modules(unet):
        m.merge()


def unmerge_lora(unet: nn.Module) -> None:
    for _, m in lora_modules(unet):
        m.unmerge()


def remove_lora(unet: nn.Module) -> List[str]:
    """Turn LoRA layers back into plain ones. Merged layers keep the merged weight, unmerged ones the base weight."""
    paths = []
    for path, m in list(lora_modules(unet)):
        _set_module(unet, path, _unwrap(m))
        paths.append(path)
    return paths


@torch.no_grad()
def set_lora(unet: nn.Module, path: str, down: torch.Tensor, up: torch.Tensor, alpha: Optional[float] = None) -> None:
    """Give the module at `path` a LoRA with these matrices (rank from `down`; alpha None means alpha = rank),
    (re)creating the layer when it is plain or its rank/alpha differ. What the file loaders build on."""
    rank = down.shape[0]
    alpha = float(rank if alpha is None else alpha)
    m = unet.get_submodule(path)
    if isinstance(m, (LoRALinear, LoRAConv2d)):
        if m.merged:
            raise ValueError(f"{path} is merged; unmerge_lora() before loading a LoRA")
        if (m.rank, m.alpha) == (rank, alpha):
            new = m
        else:
            new = _wrap(_unwrap(m), path, rank, alpha)
    else:
        new = _wrap(m, path, rank, alpha)
    new.lora_down.weight.copy_(_fit(down, new.lora_down.weight, path))
    new.lora_up.weight.copy_(_fit(up, new.lora_up.weight, path))
    _set_module(unet, path, new)


def _fit(w: torch.Tensor, like: torch.Tensor, path: str) -> torch.Tensor:
    """Accept a Linear's 2-D (out, in) for a 1x1 conv's (out, in, 1, 1) and the reverse."""
    if w.shape != like.shape and w.flatten(1).shape == like.flatten(1).shape:
        w = w.reshape(like.shape)
    if w.shape != like.shape:
        raise ValueError(f"{path}: LoRA weight of shape {tuple(w.shape)} does not fit {tuple(like.shape)}")
    return w
