"""The settings of an edit, each default written here and nowhere else: what stages 1 and 2 train
(`FitSettings`), what stage 3 samples (`SampleSettings`) and where and how the editor runs (`RuntimeSettings`).

They are frozen dataclasses that check their values when made, so a bad value fails before any work. The command
line's argument groups, the batch manifest, the recipes, `imagic.plan` and the `Editor` all read their defaults,
choices and checks from here.

Defaults: the paper's settings for Stable Diffusion (Kawar et al. 2023, Sec. 4 and the supplementary): stage 1,
1000 Adam steps at lr 2e-3; full fine-tuning, 1500 steps at 5e-7. LoRA (the default mode here, it fits a consumer
GPU) trains rank-4 adapters for 500 steps at 2e-4: its update starts from zero, so it wants a far larger lr than
full fine-tuning. Sampling: the alpha sweep public SD ports start from, 50 DDIM steps, guidance 7.5 (SD's own).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple, TypeVar, Union

import torch

from .kernels import CHOICES

PRECISIONS: Dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KERNELS = CHOICES  # auto, triton, torch (imagic.kernels.dispatch)
SQUARE = ("crop", "pad")  # how a non-square input becomes square: centre crop, or white padding
SDEDIT_STRENGTH = 0.75  # img2img's default strength (SD's scripts/img2img.py)


class Stage2Defaults(NamedTuple):
    steps: int
    lr: float


FINETUNE: Dict[str, Stage2Defaults] = {"lora": Stage2Defaults(steps=500, lr=2e-4),
                                       "full": Stage2Defaults(steps=1500, lr=5e-7)}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _one_of(name: str, value: Any, choices: Sequence[str]) -> None:
    _check(value in choices, f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class FitSettings:
    """Stages 1 and 2 (`Editor.fit`). `finetune_steps` and `finetune_lr` left None take the mode's defaults
    (`FINETUNE`); `resolved()` fills them in, and every run records its settings resolved."""

    embed_steps: int = 1000
    embed_lr: float = 2e-3
    finetune: str = "lora"  # one of FINETUNE
    finetune_steps: Optional[int] = None
    finetune_lr: Optional[float] = None
    lora_rank: int = 4
    lora_alpha: Optional[float] = None  # None: = rank (scale 1)
    seed: int = 0  # of the training noise and timesteps
    square: str = "crop"  # one of SQUARE
    save_every: int = 50  # steps between resumable saves in a run directory

    def __post_init__(self) -> None:
        _one_of("finetune", self.finetune, tuple(FINETUNE))
        _one_of("square", self.square, SQUARE)
        for name in ("embed_steps", "finetune_steps"):
            value = getattr(self, name)
            _check(value is None or value >= 0, f"{name} must be >= 0, got {value}")
        for name in ("lora_rank", "save_every"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("embed_lr", "finetune_lr", "lora_alpha"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"{name} must be > 0, got {value}")

    def resolved(self) -> "FitSettings":
        """These settings with the fine-tuning mode's step count and learning rate filled in."""
        mode = FINETUNE[self.finetune]
        return dataclasses.replace(self, finetune_steps=mode.steps if self.finetune_steps is None else
                                   self.finetune_steps,
                                   finetune_lr=mode.lr if self.finetune_lr is None else self.finetune_lr)


Numbers = Union[float, Sequence[float]]


@dataclass(frozen=True)
class SampleSettings:
    """Stage 3 (`Editor.sample`): the alphas of paper eq. 4 times the seeds, each sampled with DDIM and
    classifier-free guidance. `alpha` and `seeds` take one number or a sequence and keep a tuple."""

    alpha: Tuple[float, ...] = (0.6, 0.7, 0.8, 0.9, 1.0)
    seeds: Tuple[int, ...] = (0,)
    guidance_scale: float = 7.5
    steps: int = 50  # DDIM steps
    ddim_eta: float = 0.0  # DDIM's noise (0: deterministic); not Imagic's alpha
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        alphas = (self.alpha,) if isinstance(self.alpha, (int, float)) else self.alpha
        seeds = (self.seeds,) if isinstance(self.seeds, int) else self.seeds
        object.__setattr__(self, "alpha", tuple(float(a) for a in alphas))
        object.__setattr__(self, "seeds", tuple(int(s) for s in seeds))
        _check(len(self.alpha) > 0 and len(self.seeds) > 0, "alpha and seeds need at least one value each")
        _check(self.guidance_scale >= 0, f"guidance_scale must be >= 0, got {self.guidance_scale}")
        _check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _check(self.ddim_eta >= 0, f"ddim_eta must be >= 0, got {self.ddim_eta}")


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how the editor runs. Frozen weights are kept in `precision` with autocast for the forward; the
    trainable tensors and their Adam state stay fp32. `kernels`: see KERNELS (the `IMAGIC_KERNELS` environment
    variable, read once at start-up, decides what "auto" means). `resolution`: pixels of the square images it
    edits and makes (None: the model's native size)."""

    device: str = "auto"  # auto: cuda when available, else cpu; or cpu, cuda, cuda:1, ...
    precision: str = "fp32"  # one of PRECISIONS
    kernels: str = "auto"
    gradient_checkpointing: bool = False
    resolution: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", str(self.device))
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"unknown device {self.device!r}") from None
        _one_of("precision", self.precision, tuple(PRECISIONS))
        _one_of("kernels", self.kernels, KERNELS)
        _check(self.resolution is None or self.resolution > 0, f"resolution must be > 0, got {self.resolution}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]


S = TypeVar("S", FitSettings, SampleSettings, RuntimeSettings)


def settings_with(kind: type, settings: Optional[S], changes: Dict[str, Any]) -> S:
    """`settings` (default: `kind()`) with `changes`, the same names as keywords: how the Editor's methods take
    either a settings object or the keywords a notebook user types."""
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(kind)})
    if unknown:
        raise TypeError(f"unknown {kind.__name__} field(s): {', '.join(unknown)}")
    return dataclasses.replace(settings if settings is not None else kind(), **changes)
