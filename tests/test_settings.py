"""The settings of an edit (imagic/settings.py): each default written once, values checked when made, and every
reader (command line, manifest, recipes, planner, Editor) taking them from there."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any, Dict, Iterator, List, Set, Tuple

import pytest

from imagic import settings as S
from imagic.cli import build_parser
from imagic.settings import FINETUNE, FitSettings, RuntimeSettings, SampleSettings

ROOT = Path(__file__).resolve().parents[1]
KINDS = (FitSettings, SampleSettings, RuntimeSettings)
# Names other modules give a setting (imagic.plan counts images and DDIM steps).
ALIASES = {"alphas": "alpha", "ddim_steps": "steps", "rank": "lora_rank", "strength": "sdedit_strength"}
# A recipe's own values may equal another mode's default (the shapes recipe fine-tunes fully at LoRA's 2e-4).
OWN_VALUES = {"imagic/recipes.py"}


def defaults() -> Dict[str, Any]:
    """Every default of the settings module by field name, with the mode defaults and img2img's strength."""
    found = {f.name: f.default for kind in KINDS for f in dataclasses.fields(kind)
             if f.default is not dataclasses.MISSING and f.default is not None}
    return {**found, "finetune_steps": {m.steps for m in FINETUNE.values()},
            "finetune_lr": {m.lr for m in FINETUNE.values()}, "sdedit_strength": S.SDEDIT_STRENGTH}


def distinctive_values() -> Set[Any]:
    """Defaults that, written as a literal anywhere, can only be a second copy: the learning rates, the guidance
    scale, the alpha sweep, the stage-2 step counts (not 0, 1, or 1000, the schedule's own length)."""
    values: Set[Any] = set()
    for value in defaults().values():
        for v in (value if isinstance(value, set) else {value}):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v not in (0, 1, 1000):
                values.add(v)
    values.add(SampleSettings.alpha)
    return values - {FitSettings.seed, FitSettings.lora_rank, SampleSettings.steps, FitSettings.save_every}


def _literal(node: ast.AST) -> Any:
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    value = tuple(value) if isinstance(value, list) else value
    try:
        hash(value)
    except TypeError:  # a tuple holding a dict or a set
        return None
    return value


def _same(value: Any, default: Any) -> bool:
    if isinstance(default, set):
        return any(_same(value, d) for d in default)
    return type(value) is type(default) and value == default or (
        isinstance(value, tuple) and isinstance(default, tuple) and value == default)


def named_defaults(tree: ast.AST) -> Iterator[Tuple[str, ast.AST, int]]:
    """(name, default value node, line) for function parameters, `add_argument(..., default=...)` and class-level
    annotated assignments."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = [*args.posonlyargs, *args.args]
            for arg, default in zip(positional[len(positional) - len(args.defaults):], args.defaults):
                yield arg.arg, default, default.lineno
            for arg, kw_default in zip(args.kwonlyargs, args.kw_defaults):
                if kw_default is not None:
                    yield arg.arg, kw_default, kw_default.lineno
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            options = [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
            for kw in node.keywords:
                if kw.arg == "default" and options:
                    yield options[0][2:].replace("-", "_"), kw.value, kw.value.lineno
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value is not None:
                    yield item.target.id, item.value, item.lineno


def restated(where: str, source: str) -> List[str]:
    """Where the module `where` (its path from the repository root) with this source restates a default."""
    tree = ast.parse(source)
    known, found = defaults(), []
    for name, node, line in named_defaults(tree):
        name = ALIASES.get(name, name)
        value = _literal(node)
        if name in known and value is not None and _same(value, known[name]):
            found.append(f"{where}:{line}: default {name} = {value!r} restated")
    if where not in OWN_VALUES:
        distinctive = distinctive_values()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Constant, ast.Tuple, ast.List)):
                value = _literal(node)
                if isinstance(value, (int, float, tuple)) and not isinstance(value, bool) and value in distinctive:
                    found.append(f"{where}:{node.lineno}: the literal {value!r} is a default of imagic.settings")
    return found


def test_every_default_is_written_once():
    """No module of the library restates a default of imagic/settings.py: not as a parameter default, an argparse
    default or a dataclass field of the same name, nor as one of the distinctive values anywhere."""
    modules = [p for p in sorted((ROOT / "imagic").rglob("*.py")) if p != ROOT / "imagic" / "settings.py"]
    assert len(modules) > 30
    found = [line for p in modules for line in restated(str(p.relative_to(ROOT)), p.read_text(encoding="utf-8"))]
    assert not found, "\n".join(found)


def test_the_check_finds_restated_defaults():
    """The scan above finds each kind of restatement it looks for."""
    source = ("def sample(x, guidance_scale=7.5, seeds=(0,)):\n    pass\n"
              "p.add_argument('--embed-lr', type=float, default=0.002)\n"
              "class Sampling:\n    steps: int = 50\n"
              "ALPHAS = [0.6, 0.7, 0.8, 0.9, 1.0]\n"
              "lr = 5e-7 if full else 2e-4\n")
    found = "\n".join(restated("imagic/probe.py", source))
    for needle in ("guidance_scale = 7.5", "seeds = (0,)", "embed_lr = 0.002", "steps = 50", "literal (0.6",
                   "literal 5e-07", "literal 0.0002"):
        assert needle in found, (needle, found)


def test_settings_check_their_values():
    for kind, bad, message in ((FitSettings, {"finetune": "dreambooth"}, "finetune must be one of lora, full"),
                               (FitSettings, {"embed_steps": -1}, "embed_steps"),
                               (FitSettings, {"square": "stretch"}, "square"),
                               (SampleSettings, {"steps": 0}, "steps"), (SampleSettings, {"alpha": ()}, "alpha"),
                               (RuntimeSettings, {"precision": "fp8"}, "precision"),
                               (RuntimeSettings, {"kernels": "cuda"}, "kernels"),
                               (RuntimeSettings, {"device": "tpu:x"}, "device")):
        with pytest.raises(ValueError, match=message):
            kind(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        FitSettings().embed_steps = 3  # type: ignore[misc]
    assert SampleSettings(alpha=1, seeds=[2, 3]) == SampleSettings(alpha=(1.0,), seeds=(2, 3))
    full = FitSettings(finetune="full")
    assert full.finetune_steps is None and full.resolved().finetune_steps == FINETUNE["full"].steps
    assert dataclasses.replace(FitSettings(), finetune="full").resolved().finetune_lr == FINETUNE["full"].lr


@pytest.mark.parametrize("kind", KINDS)
def test_the_command_line_takes_every_default_from_the_settings(kind):
    from imagic.arguments import settings_from

    args = build_parser().parse_args(["edit", "--ckpt", "m", "--image", "i", "--prompt", "p", "--out", "o"])
    assert settings_from(kind, args) == kind()


def test_bad_values_are_refused_by_the_settings_message(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["edit", "--ckpt", "m", "--image", "i", "--prompt", "p", "--out", "o",
                                   "--ddim-eta", "-1"])
    assert "ddim_eta must be >= 0, got -1.0" in capsys.readouterr().err
