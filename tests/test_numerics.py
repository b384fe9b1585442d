"""Numerical faults: infinities and NaNs injected into the loss, the gradients, the UNet output and its weights, in
an fp16 editor. Each is stopped before the optimiser step with a NumericalError naming the stage and the step; the
run directory keeps the last good state, and once the fault is gone the run resumes to exactly the result of a run
that never met it.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from PIL import Image, ImageDraw

from imagic.editor import Editor
from imagic.fileio import load_safetensors
from imagic.rundir import RunDir
from imagic.steps import NO_AUTOCAST, gradients_finite, make_adam, optimizer_step
from imagic.training import NumericalError, run_loop
from tests.tiny import write_tiny_checkpoint


# --- the loop itself, on a toy problem ---------------------------------------------------------------------------
def _toy(fault: Dict[int, str], resume: Optional[Path], steps: int = 10) -> Tuple[torch.Tensor, List[float]]:
    """Adam on a noisy quadratic; at the step numbers in `fault` the loss or the gradient goes bad."""
    p = torch.zeros(8, requires_grad=True)
    target = torch.linspace(-1, 1, 8)
    calls = {"n": 0}

    def loss_fn(gen: torch.Generator) -> torch.Tensor:
        calls["n"] += 1
        x = p - target + 0.1 * torch.randn(8, generator=gen)
        kind = fault.get(calls["n"])
        if kind == "grad":  # a finite loss whose backward pass overflows, as an fp16 backward can
            x.register_hook(lambda g: g * math.inf)
        return (x ** 2).mean() * {"nan": math.nan, "inf": math.inf}.get(kind, 1.0)

    state = run_loop("stage 1: embedding", [p], lambda opt, gen: optimizer_step([p], opt, lambda: loss_fn(gen),
                                                                                NO_AUTOCAST),
                     steps=steps, lr=0.1, seed=3, resume_path=resume, save_every=2, progress=False)
    return p.detach(), state.losses


@pytest.mark.parametrize("kind,at", [("nan", 1), ("inf", 4), ("grad", 5), ("grad", 1), ("nan", 10)])
def test_loop_stops_before_the_step_and_resumes_exactly(tmp_path, kind, at):
    want, want_losses = _toy({}, tmp_path / "clean.pt")
    resume = tmp_path / "state.pt"
    what = "the gradient has inf or nan values" if kind == "grad" else f"loss is {kind}"
    with pytest.raises(NumericalError, match=rf"^stage 1: embedding: {what}.* at step {at}\b"):
        _toy({at: kind}, resume)
    saved_step = (at - 1) // 2 * 2
    if saved_step:
        state = torch.load(resume, weights_only=True)
        assert state["step"] == saved_step and all(torch.isfinite(t).all() for t in state["params"])
    else:
        assert not resume.exists()
    got, losses = _toy({}, resume)  # a fresh start from the saved state, as a new process would make
    assert torch.equal(got, want) and losses == want_losses


# --- an fp16 editor, faults injected into the UNet ----------------------------------------------------------------
FAST = dict(embed_steps=6, embed_lr=2e-2, finetune_steps=6, finetune_lr=1e-2, save_every=2)


class Faults:
    """Wraps the UNet's forward; `callback(stage, step)` arms a fault for the next forward pass."""

    def __init__(self, editor: Editor):
        self.editor, self.armed, self.plan = editor, None, {}
        self.real = editor.unet.forward
        editor.unet.forward = self.forward
        self.out_weight = editor.unet.out[2].weight  # the last conv, fp16
        self.saved = self.out_weight.detach().clone()

    def forward(self, x, t, c):
        kind, self.armed = self.armed, None
        if kind == "overflow":  # finite weights, the largest 60000, whose sums no longer fit in fp16 (max 65504)
            self.out_weight.data.mul_(6e4 / float(self.out_weight.abs().max()))
            assert torch.isfinite(self.out_weight).all()
        out = self.real(x, t, c)
        if kind == "inf_output":
            out = out * math.inf
        if kind == "grad":
            out.register_hook(lambda g: g * math.inf)
        return out

    def callback(self, stage: str, step: int, loss: float) -> None:
        self.armed = self.plan.get((stage.split(":")[0], step))

    def heal(self) -> None:
        self.out_weight.data.copy_(self.saved)

    def remove(self) -> None:
        del self.editor.unet.forward


@pytest.fixture(scope="module")
def editor(tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("numerics") / "tiny.safetensors", "sd1")
    ed = Editor.from_checkpoint(ckpt, device="cpu", precision="fp16", progress=False)
    assert next(ed.unet.parameters()).dtype == torch.float16
    return ed


@pytest.fixture(scope="module")
def image():
    img = Image.new("RGB", (40, 32), (20, 30, 200))
    ImageDraw.Draw(img).ellipse([12, 8, 28, 24], fill=(220, 20, 20))
    return img


def _consistent(rd: RunDir, stage: int, saved_step: int) -> None:
    """After a fault: the last saved state is intact and finite, the stage's result is not written, no temp files."""
    state = torch.load(rd.resume_state(stage), weights_only=True)
    assert state["step"] == saved_step
    assert all(torch.isfinite(t).all() for t in state["params"])
    assert len(rd.read_losses(stage)) == saved_step and all(map(math.isfinite, rd.read_losses(stage)))
    assert not (rd.optimized_embedding if stage == 1 else rd.lora).exists()
    assert not list(rd.root.rglob("*.tmp"))


@pytest.mark.timeout(600)
def test_fp16_faults_in_each_stage_then_resume_equals_clean_run(editor, image, tmp_path):
    clean = editor.fit(image, "a red square", out=tmp_path / "clean", **FAST)
    rd = RunDir(tmp_path / "run")
    faults = Faults(editor)
    try:
        # (stage, step after which the fault is armed) -> fault; the fault hits the next step.
        for plan, stage, step, message in [
            ({("stage 1", 2): "inf_output"}, 1, 3, r"loss is (inf|nan)"),
            ({("stage 1", 3): "grad"}, 1, 4, r"the gradient has inf or nan values"),
            ({("stage 2", 4): "overflow"}, 2, 5, r"loss is (inf|nan)"),
        ]:
            faults.plan = plan
            with pytest.raises(NumericalError) as ei:
                editor.fit(image, "a red square", out=rd.root, callback=faults.callback, **FAST)
            msg = str(ei.value)
            assert re.match(rf"stage {stage}: .*{message}.* at step {step}\b", msg), msg
            assert "\n" not in msg and "resumed" in msg
            _consistent(rd, stage, saved_step=(step - 1) // 2 * 2)
            faults.heal()
    finally:
        faults.remove()
        faults.heal()
    run = editor.fit(image, "a red square", out=rd.root, **FAST)
    assert torch.equal(run.optimized_embedding, clean.optimized_embedding)
    assert run.finetuned.keys() == clean.finetuned.keys()
    for k in clean.finetuned:
        assert torch.equal(run.finetuned[k], clean.finetuned[k]), k
    assert run.losses == clean.losses
    ours, theirs = load_safetensors(rd.lora)[0], load_safetensors(tmp_path / "clean" / "lora.safetensors")[0]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.timeout(300)
def test_non_finite_input_image_tensor_is_refused(editor):
    """A tensor input with NaN is refused before it reaches the VAE (to_pil checks), as a ValueError."""
    with pytest.raises(ValueError, match="NaN or Inf"):
        editor.fit(torch.full((1, 3, 8, 8), math.nan), "a red square", embed_steps=1, finetune_steps=1)


def test_fp16_fault_while_sampling_names_stage_3(editor, image, tmp_path):
    run = editor.fit(image, "a red square", out=tmp_path / "run", **{**FAST, "embed_steps": 2,
                                                                      "finetune_steps": 2})
    faults = Faults(editor)
    faults.armed = "inf_output"
    try:
        with pytest.raises(NumericalError, match=r"stage 3"):
            editor.sample(run, alpha=[1.0], seeds=[0], steps=2)
    finally:
        faults.remove()


# --- the loop's fast paths against torch's plain implementations ------------------------------------------------
def test_grads_finite_agrees_with_isfinite_on_every_tensor():
    """The one-sum check equals torch.isfinite over every element, for each kind of bad value in any tensor."""
    def _grads_finite(params):
        return gradients_finite(params, NO_AUTOCAST)

    gen = torch.Generator().manual_seed(0)
    params = [torch.zeros(s, requires_grad=True) for s in [(3, 4), (7,), (2, 2, 5), (1,)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e3
    assert _grads_finite(params)
    for i, p in enumerate(params):
        for bad in (float("nan"), float("inf"), -float("inf")):
            saved = p.grad.clone()
            p.grad.view(-1)[-1] = bad
            expected = all(bool(torch.isfinite(q.grad).all()) for q in params)
            assert _grads_finite(params) == expected is False, (i, bad)
            p.grad = saved
    params[1].grad.view(-1)[0], params[2].grad.view(-1)[0] = float("inf"), -float("inf")  # sum would be NaN
    assert not _grads_finite(params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_make_adam_follows_torch_single_tensor_adam(dtype):
    """`make_adam` (fused on fp32 CPU tensors) takes the same steps as torch's reference for-loop Adam."""
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in [(16, 8), (8,), (3, 3, 2)]]
    ours, ref = ([t.clone().requires_grad_(True) for t in init] for _ in range(2))
    opt_ours = make_adam(ours, lr=1e-2)
    opt_ref = torch.optim.Adam(ref, lr=1e-2, foreach=False)
    assert bool(opt_ours.defaults["fused"]) == (dtype == torch.float32)
    for _ in range(20):
        grads = [torch.randn(t.shape, generator=gen, dtype=dtype) for t in init]
        for params, opt in ((ours, opt_ours), (ref, opt_ref)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
