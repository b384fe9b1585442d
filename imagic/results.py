"""What `Editor.fit` and `Editor.sample` return: a fitted `Run` (both embeddings, the stage-2 weights, where it
lives) and a `SampleResult` (the images of a sweep, its grid, where they were saved)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from PIL import Image
from torch import Tensor

from .settings import FitSettings
from .steps import SizeConditioning


@dataclass
class Run:
    """The result of `Editor.fit`: both embeddings (on SDXL, context and pooled packed: imagic.conditioning) and
    the fine-tuned weights (LoRA or full UNet)."""

    target_text: str
    settings: FitSettings
    target_embedding: Tensor
    optimized_embedding: Tensor
    finetuned: Dict[str, Tensor]  # our LoRA state dict, or the full UNet state dict
    input_image: Image.Image
    losses: Dict[str, List[float]] = field(default_factory=dict)
    directory: Optional[Path] = None
    size_conditioning: Optional[SizeConditioning] = None  # SDXL: original size, crop, target (args.json)


@dataclass
class SampleResult:
    """The result of `Editor.sample`: one image per (seed, alpha), and their grid (rows seeds, columns alphas)."""

    images: Dict[Tuple[int, float], Image.Image]  # (seed, alpha) -> image
    grid: Image.Image
    seeds: List[int]
    alphas: List[float]
    paths: Dict[Tuple[int, float], Path] = field(default_factory=dict)  # where each image was saved (if it was)
    grid_path: Optional[Path] = None  # this call's grid in the run directory: grid.png, grid-2.png, ...
