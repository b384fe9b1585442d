"""The optimisation loop both Imagic training stages run (`imagic.fitting`): Adam over a step function from
`imagic.steps`, with seeded noise, resumable state and NaN checks.

The loop owns the optimizer and the CPU generator the steps draw t and the noise from, so a run is bit-identical on
CPU for a given seed, and a resumed run continues the exact random stream of the interrupted one: every
`save_every` steps the parameters, Adam's moments and the generator state go to a resume file, atomically.
"""
from __future__ import annotations

import logging
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .fileio import save_torch
from .steps import NonFinite, make_adam

log = logging.getLogger(__name__)

# callback(stage, step, loss) after every optimiser step; a notebook can plot or stop (raise) from it.
StepCallback = Callable[[str, int, float], None]


class NumericalError(RuntimeError):
    """A NaN or Inf loss or gradient. The message names the stage and the step; the last saved state is intact."""


class ResumeError(ValueError):
    """A resume state that cannot be read back (damaged or replaced after our atomic write); the message names the
    file and says to delete it to restart the stage."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory mid-stage. The message (one line) names the stage, the step, the step the run
    directory keeps, and settings that need less memory."""


LESS_MEMORY = "--precision bf16, --finetune lora, --gradient-checkpointing"


def out_of_memory(where: str, error: BaseException, then: str) -> OutOfMemory:
    """An OutOfMemory for `where` with torch's own first line (what was asked for, what was free) and what to do."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return OutOfMemory(f"{where}: out of memory ({detail.rstrip('.')}); {then}")


def peak_memory(device: torch.device) -> str:
    """Peak memory so far: allocated GPU memory on CUDA, the process's max resident set on CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA peak allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"


@dataclass
class LoopState:
    """Everything needed to continue a stage exactly where it stopped."""

    step: int = 0
    losses: List[float] = field(default_factory=list)


def _save_resume(path: Path, params: Sequence[Tensor], opt: torch.optim.Optimizer, gen: torch.Generator,
                 state: LoopState) -> None:
    # Our own file of plain tensors and numbers: read back with torch.load(weights_only=True).
    payload = {"step": state.step, "losses": state.losses, "rng": gen.get_state(),
               "params": [p.detach().cpu() for p in params], "optimizer": opt.state_dict()}
    save_torch(path, payload)


def _load_resume(path: Path, params: Sequence[Tensor], opt: torch.optim.Optimizer,
                 gen: torch.Generator) -> LoopState:
    """Restore a saved state. Our writes are atomic, so an unreadable file was damaged or replaced afterwards:
    say which file and how to start the stage over, rather than fail somewhere inside torch."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if len(payload["params"]) != len(params):
            raise ValueError(f"{len(payload['params'])} saved tensors for {len(params)} parameters")
        with torch.no_grad():
            for p, saved in zip(params, payload["params"]):
                p.copy_(saved.to(p.device))
        opt.load_state_dict(payload["optimizer"])
        gen.set_state(payload["rng"])
        return LoopState(step=int(payload["step"]), losses=[float(x) for x in payload["losses"]])
    except Exception as e:  # truncated zip, foreign pickle, wrong shapes, missing keys, ...
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ResumeError(f"{path}: unreadable resume state ({reason}); delete it to restart this stage") from None


# step(optimizer, generator) -> loss: one step of `imagic.steps` with its inputs bound (stage1_step, stage2_step)
Step = Callable[[torch.optim.Optimizer, torch.Generator], Tensor]


def run_loop(stage: str, params: List[Tensor], step: Step, steps: int, lr: float, seed: int, save_every: int,
             resume_path: Optional[Path] = None, callback: Optional[StepCallback] = None, progress: bool = True,
             on_save: Optional[Callable[[LoopState], None]] = None) -> LoopState:
    """Adam on `params` for `steps` calls of `step`.

    With `resume_path`, state is saved there every `save_every` steps (atomically) and, when the file exists at
    start, the loop continues from it: parameters, Adam moments and the RNG stream are restored, so the result equals
    an uninterrupted run. A non-finite loss or gradient (the step's `NonFinite`) becomes a NumericalError naming
    the stage and step; the step updated nothing, so the saved state never holds the damage.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = make_adam(params, lr)
    state = LoopState()
    if resume_path is not None and resume_path.exists():
        state = _load_resume(resume_path, params, opt, gen)
        log.info("%s: resuming at step %d of %d", stage, state.step, steps)
    bar = tqdm(total=steps, initial=state.step, desc=stage, disable=not progress, dynamic_ncols=True)
    saved = state.step
    try:
        while state.step < steps:
            try:
                value = float(step(opt, gen))
            except NonFinite as bad:
                raise _numerical_error(stage, state.step + 1, bad) from None
            state.step += 1
            state.losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if callback is not None:
                callback(stage, state.step, value)
            if resume_path is not None and (state.step % save_every == 0 or state.step == steps):
                _save_resume(resume_path, params, opt, gen, state)
                saved = state.step
                if on_save is not None:
                    on_save(state)
    except torch.cuda.OutOfMemoryError as e:  # since torch 2.5 the class of every device's out-of-memory error
        kept = ("nothing is saved" if resume_path is None else
                f"the run directory keeps step {saved}" if saved else "the stage will start over")
        raise out_of_memory(f"{stage}: step {state.step + 1} of {steps}", e,
                            f"{kept}; rerun the same command to resume, with {LESS_MEMORY} to need less") from None
    finally:
        bar.close()
    return state


def _numerical_error(stage: str, step: int, bad: NonFinite) -> NumericalError:
    if bad.what == "loss":
        return NumericalError(f"{stage}: loss is {float(bad.loss)} at step {step}; nothing was updated (try "
                              "--precision fp32 or a lower learning rate; the run can be resumed)")
    return NumericalError(f"{stage}: the gradient has inf or nan values at step {step} (loss {float(bad.loss):.4g}); "
                          "nothing was updated (try --precision fp32 or bf16, or a lower learning rate; the run can "
                          "be resumed)")
