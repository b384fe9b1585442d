"""Recipes (imagic/recipes.py): named settings for the CLI and the API; explicit flags win over a recipe."""
from __future__ import annotations

import pytest

from imagic.arguments import recipe_in
from imagic.cli import build_parser
from imagic.settings import FitSettings
from imagic.recipes import RECIPES, recipe

EDIT = ["edit", "--ckpt", "m.safetensors", "--image", "in.png", "--prompt", "a red star", "--out", "o"]


def parse(argv):
    return build_parser(recipe_in(argv)).parse_args(argv)


def test_paper_recipe_is_the_library_defaults():
    args = parse(EDIT)
    assert args.recipe == "paper"
    fit = FitSettings()
    assert (args.embed_steps, args.embed_lr, args.finetune, args.lora_rank) == (
        fit.embed_steps, fit.embed_lr, fit.finetune, fit.lora_rank)


@pytest.mark.parametrize("name", ["shapes"])
def test_a_recipe_sets_every_value_it_names_and_flags_override_it(name):
    r = recipe(name)
    args = parse(EDIT + ["--recipe", name])
    for key, value in {**r.fit, **r.sample}.items():
        assert getattr(args, key) == value, key
    args = parse(EDIT + ["--embed-steps", "7", "--recipe", name, "--alpha", "0.5"])
    assert args.embed_steps == 7 and args.alpha == [0.5] and args.finetune_lr == r.fit["finetune_lr"]


def test_recipe_values_are_valid_fit_settings_and_reach_every_command():
    for r in RECIPES.values():
        FitSettings(**r.fit)  # raises on a bad value
    for command in (["train"] + EDIT[1:], ["batch", "m.jsonl", "--ckpt", "m", "--out", "o"],
                    ["plan", "--family", "sd1"]):
        args = parse(command + ["--recipe", "shapes"])
        assert args.finetune_steps == RECIPES["shapes"].fit["finetune_steps"], command[0]
    args = parse(["txt2img", "--ckpt", "m", "--prompt", "p", "--out", "o", "--recipe", "shapes"])
    assert args.guidance_scale == RECIPES["shapes"].sample["guidance_scale"]


def test_unknown_recipe_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        parse(EDIT + ["--recipe", "fastest"])
    assert "invalid choice: 'fastest'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown recipe 'fastest'"):
        recipe("fastest")


def test_shapes_eval_settings_are_the_shapes_recipe():
    from tests.test_shapes_budget import _module

    settings = _module("shapes_eval").Settings()
    r = recipe("shapes")
    assert {k: getattr(settings, k) for k in r.fit} == r.fit
    assert all(getattr(settings, k) == v for k, v in r.sample.items() if k != "alpha")
    assert settings.alpha in r.sample["alpha"]
