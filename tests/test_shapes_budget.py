"""benchmarks/shapes_budget.py (issue 30, item 4): the grid's shortcut and its choice of the fast preset.

The grid samples smaller stage-2 budgets from the weights kept on the way of one longer fit. That is only the same
as a shorter fit if both stages are plain constant-lr Adam on a seeded stream, which this test pins down."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "weights" / "shapes" / "shapes.safetensors"


def _module(name: str):
    """A benchmarks/ script as a module (registered first: its dataclasses look themselves up)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def modules():
    return _module("shapes_eval"), _module("shapes_budget")


@pytest.mark.skipif(not CKPT.is_file(), reason="weights/shapes/shapes.safetensors not present")
@pytest.mark.parametrize("mode,lr", [("full", 2e-4), ("lora", 2e-3)])
def test_weights_kept_after_k_steps_equal_a_k_step_fit(modules, mode, lr):
    E, B = modules
    torch.set_num_threads(1)
    editor = E.load_editor()
    edit = E.make_edits(1, E.TUNE_NAMESPACE)[0]
    settings = E.Settings()
    runs, per_step = B.fit_prefixes(editor, edit, settings, mode, lr, embed_steps=3, finetune_steps=(2, 4))
    assert set(runs) == {2, 4} and set(per_step) == {"stage 1", "stage 2"}
    short = editor.fit(E.S.render_pil(edit.source), edit.prompt,
                       **{**settings.fit_kwargs(edit.index), "embed_steps": 3, "finetune": mode, "finetune_lr": lr,
                          "finetune_steps": 2})
    assert runs[2].settings.finetune_steps == 2 and torch.equal(runs[2].optimized_embedding, short.optimized_embedding)
    moved = 0
    for k, v in short.finetuned.items():
        # Up to float32 rounding only (the two fits run the same ops; summation order may follow buffer
        # alignment): each Adam step moves a weight by at most ~lr, so a rounding-level difference in one
        # gradient stays far below lr / 1000. The kept weights must also differ from the 4-step ones.
        assert torch.allclose(runs[2].finetuned[k], v, rtol=0, atol=lr * 1e-3), k
        moved += not torch.equal(runs[4].finetuned[k], v)
    assert moved > 0


def test_fast_preset_rule_takes_the_cheapest_cell_within_five_points(modules):
    _, B = modules
    scores = {("full", 100, 300): 0.70, ("full", 50, 150): 0.66, ("full", 25, 75): 0.655, ("lora", 25, 75): 0.50}
    seconds = {("full", 100, 300): 18.0, ("full", 50, 150): 9.0, ("full", 25, 75): 4.5, ("lora", 25, 75): 3.0}
    assert B.fastest_within(scores, seconds) == ("full", 25, 75)
    scores[("full", 25, 75)] = 0.6499  # 5.01 points down: out
    assert B.fastest_within(scores, seconds) == ("full", 50, 150)
    image = B.plot(scores, seconds, "test")
    assert image.size == (640, 400) and len(set(image.getdata())) > 3
