"""Named bundles of stage 1-3 settings ("recipes"): `imagic edit --recipe shapes`, or in Python

    r = imagic.recipe("shapes")
    run = editor.fit(image, text, **r.fit)                    # or editor.fit(image, text, settings=r.fit_settings())
    editor.sample(run, seeds=[0, 1], **r.sample)

`paper` is the library's defaults (the paper's SD settings, LoRA for a consumer GPU). The `shapes` recipes are for
the small built-in model (weights/shapes), whose 64-pixel images and tiny widths want far larger learning rates
and far fewer steps than SD: they are measured there, not transferable to SD. `shapes` is what
benchmarks/shapes_eval.py evaluates (its `Settings` read it) and `make demo` runs. Its step counts are the fewest of
the grid in benchmarks/results/shapes_budget.md whose "both" (edit made and identity kept) is within 5 points of the
best on the tuning edits; that is the best cell itself (100 + 600 steps): every cheaper cell measured lost 12
points or more, so there is no separate fast recipe. Explicit arguments override a recipe's values. A recipe names
only the values it changes; `imagic.settings` holds the defaults and checks every value when the recipe is made.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, Mapping

from .settings import FINETUNE, FitSettings, SampleSettings

# The built-in model's settings: stage 2 at 600 steps and alpha 1.4 won the step-budget grid on the tuning edits.
_SHAPES_FIT = dict(embed_steps=100, embed_lr=1e-2, finetune="full", finetune_steps=600, finetune_lr=2e-4)
_SHAPES_SAMPLE = dict(alpha=[0.0, 0.4, 0.8, 1.2, 1.4, 1.6], guidance_scale=5.0, steps=25, ddim_eta=0.0)


@dataclass(frozen=True)
class Recipe:
    """`fit`: the FitSettings fields it sets (keywords of `Editor.fit`); `sample`: the SampleSettings fields it
    sets (keywords of `Editor.sample`). Read-only, and checked by those dataclasses when the recipe is made."""

    about: str
    fit: Mapping[str, Any] = field(default_factory=dict)
    sample: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fit_settings(), self.sample_settings()  # a bad name or value fails here, at import
        object.__setattr__(self, "fit", MappingProxyType(dict(self.fit)))
        object.__setattr__(self, "sample", MappingProxyType(dict(self.sample)))

    def fit_settings(self) -> FitSettings:
        return FitSettings(**self.fit)

    def sample_settings(self) -> SampleSettings:
        return SampleSettings(**self.sample)


RECIPES: Dict[str, Recipe] = {
    "paper": Recipe(f"the defaults: the paper's SD settings ({FitSettings.embed_steps} embedding steps; LoRA "
                    f"{FINETUNE['lora'].steps} steps, or full {FINETUNE['full'].steps})"),
    "shapes": Recipe("the built-in shapes model (weights/shapes), as benchmarks/shapes_eval.py measures it; the "
                     "fewest steps within 5 points of the best (benchmarks/results/shapes_budget.md)",
                     _SHAPES_FIT, _SHAPES_SAMPLE),
}


def recipe(name: str) -> Recipe:
    """The recipe called `name` (one of RECIPES)."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose {', '.join(RECIPES)}") from None
