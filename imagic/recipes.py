"""Named bundles of stage 1-3 settings ("recipes"): `imagic edit --recipe shapes`, or in Python

    r = imagic.recipe("shapes")
    run = editor.fit(image, text, **r.fit)
    editor.sample(run, seeds=[0, 1], **r.sample)

`paper` is the library's defaults (the paper's SD settings, LoRA for a consumer GPU). The `shapes` recipes are for
the small built-in model (weights/shapes), whose 64-pixel images and tiny widths want far larger learning rates
and far fewer steps than SD: they are measured there, not transferable to SD. `shapes` is what
benchmarks/shapes_eval.py evaluates (its `Settings` read it) and `make demo` runs. Its step counts are the fewest of
the grid in benchmarks/results/shapes_budget.md whose "both" (edit made and identity kept) is within 5 points of the
best on the tuning edits; that is the best cell itself (100 + 600 steps): every cheaper cell measured lost 12
points or more, so there is no separate fast recipe. Explicit arguments override a recipe's values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

# The built-in model's settings: stage 2 at 600 steps and alpha 1.4 won the step-budget grid on the tuning edits.
_SHAPES_FIT = dict(embed_steps=100, embed_lr=1e-2, finetune="full", finetune_steps=600, finetune_lr=2e-4)
_SHAPES_SAMPLE = dict(alpha=[0.0, 0.4, 0.8, 1.2, 1.4, 1.6], guidance_scale=5.0, steps=25, ddim_eta=0.0)


@dataclass(frozen=True)
class Recipe:
    """`fit`: keyword arguments of `Editor.fit` (FitSettings fields); `sample`: of `Editor.sample`."""

    about: str
    fit: Dict[str, Any] = field(default_factory=dict)
    sample: Dict[str, Any] = field(default_factory=dict)


RECIPES: Dict[str, Recipe] = {
    "paper": Recipe("the defaults: the paper's SD settings (1000 embedding steps; LoRA 500 steps, or full 1500)"),
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
