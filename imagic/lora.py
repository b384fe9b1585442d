"""LoRA for the UNet (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), with kohya export.

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

kohya format: SD 1.x/2.x LoRA files name modules by the *diffusers* UNet
(`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`, `.lora_up.weight`,
`.alpha`), because sd-scripts trains those models on a diffusers-layout UNet. Our modules have the LDM names, so
`transformer_paths` rebuilds the block loop of `openaimodel.UNetModel` to map each SpatialTransformer
(`input_blocks.1.1`) to its diffusers parent (`down_blocks.0.attentions.0`) with the index arithmetic of
diffusers' `convert_ldm_unet_checkpoint`; everything below a transformer has the same names in both.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from imagic.config import UNetConfig

# kohya's default for the UNet: every Linear / 1x1 Conv2d inside a SpatialTransformer (diffusers'
# Transformer2DModel). Matched against the last components of a module path.
DEFAULT_TARGETS: Tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")

_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


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

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 4,
                 alpha: Optional[float] = None, device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_lora(rank, alpha)
        self.lora_down = nn.Linear(in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_up = nn.Linear(rank, out_features, bias=False, device=device, dtype=torch.float32)
        self.reset_lora_parameters()

    @classmethod
    def from_base(cls, base: nn.Linear, rank: int = 4, alpha: Optional[float] = None) -> "LoRALinear":
        new = cls(base.in_features, base.out_features, base.bias is not None, rank, alpha,
                  device="meta", dtype=base.weight.dtype)
        return new._adopt(base)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_lora(x, super().forward(x), F.linear)


class LoRAConv2d(_LoRAMixin, nn.Conv2d):
    """A 1x1 nn.Conv2d (SD1's proj_in/proj_out) + scale * lora_up(lora_down(x)), both 1x1 convs without bias."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, rank: int = 4,
                 alpha: Optional[float] = None, device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__(in_channels, out_channels, 1, bias=bias, device=device, dtype=dtype)
        self._init_lora(rank, alpha)
        self.lora_down = nn.Conv2d(in_channels, rank, 1, bias=False, device=device, dtype=torch.float32)
        self.lora_up = nn.Conv2d(rank, out_channels, 1, bias=False, device=device, dtype=torch.float32)
        self.reset_lora_parameters()

    @classmethod
    def from_base(cls, base: nn.Conv2d, rank: int = 4, alpha: Optional[float] = None) -> "LoRAConv2d":
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


def inject_lora(unet: nn.Module, rank: int = 4, alpha: Optional[float] = None,
                targets: Sequence[str] = DEFAULT_TARGETS, seed: Optional[int] = None) -> List[str]:
    """Replace every module whose path ends with one of `targets` by its LoRA wrapper; returns their paths.

    The whole model is frozen (`requires_grad_(False)`) and only the new LoRA matrices train, as in kohya's
    trainer. `seed` makes the random init of `lora_down` reproducible on any device. Convert the model's dtype/device before injecting: a later `.half()` would also cast the LoRA.
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
    """`lora_unet_` + the diffusers path with '.' -> '_' (sd-scripts' LoRANetwork naming)."""
    return "lora_unet_" + diffusers_path(path, cfg).replace(".", "_")


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

    Text-encoder entries (`lora_te*`) are skipped with a warning; anything else that is not a plain LoRA on a
    module of this UNet is an error that lists the names.
    """
    cfg = _config(unet, cfg)
    te = [k for k in sd if k.startswith("lora_te")]
    if te:
        warnings.warn(f"skipping {len(te)} text-encoder LoRA tensors (lora_te*): only the UNet LoRA is loaded")
    entries = _group({k: v for k, v in sd.items() if not k.startswith("lora_te")})
    names = {kohya_name(p, cfg): p for p, _ in unet.named_modules() if _inside_transformer(p, cfg)}
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


@torch.no_grad()
def _load(unet: nn.Module, entries: Dict[str, Dict[str, torch.Tensor]]) -> List[str]:
    """Copy each entry into the LoRA at its path, (re)creating the layer when it is plain or its rank/alpha differ.

    A missing alpha means alpha = rank (kohya's convention), i.e. scale 1.
    """
    for path, e in entries.items():
        rank = e["lora_down.weight"].shape[0]
        alpha = float(e["alpha"]) if "alpha" in e else float(rank)
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
        new.lora_down.weight.copy_(_fit(e["lora_down.weight"], new.lora_down.weight, path))
        new.lora_up.weight.copy_(_fit(e["lora_up.weight"], new.lora_up.weight, path))
        _set_module(unet, path, new)
    return list(entries)


def _fit(w: torch.Tensor, like: torch.Tensor, path: str) -> torch.Tensor:
    """Accept a Linear's 2-D (out, in) for a 1x1 conv's (out, in, 1, 1) and the reverse."""
    if w.shape != like.shape and w.flatten(1).shape == like.flatten(1).shape:
        w = w.reshape(like.shape)
    if w.shape != like.shape:
        raise ValueError(f"{path}: LoRA weight of shape {tuple(w.shape)} does not fit {tuple(like.shape)}")
    return w
