"""The optimisation loop shared by both Imagic training stages, with seeded noise, resumable state and NaN checks.

Both stages minimise the same denoising loss on the input image's latent x0 (paper eq. 2, and eq. 3 for the
fine-tuning with e_opt frozen):

    L(params) = || target(x0, eps, t) - f(x_t, t, e) ||^2,   x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps

with t uniform and eps standard normal, both drawn from one seeded CPU generator, so a run is bit-identical on CPU
for a given seed, and a resumed run continues the exact random stream of the interrupted one. The target is the noise
for epsilon models and the velocity for v models (SD 2.x 768-v) — what the model was trained to predict.
"""
from __future__ import annotations

import contextlib
import logging
import math
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .fileio import save_torch
from .rundir import RunError
from .schedule import NoiseSchedule

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# callback(stage, step, loss) after every optimiser step; a notebook can plot or stop (raise) from it.
StepCallback = Callable[[str, int, float], None]


class NumericalError(RuntimeError):
    """A NaN or Inf loss or gradient. The message names the stage and the step; the last saved state is intact."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory mid-stage. The message (one line) names the stage, the step, the step the run
    directory keeps, and settings that need less memory."""


LESS_MEMORY = "--precision bf16, --finetune lora, --gradient-checkpointing"


def out_of_memory(where: str, error: BaseException, then: str) -> OutOfMemory:
    """An OutOfMemory for `where` with torch's own first line (what was asked for, what was free) and what to do."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return OutOfMemory(f"{where}: out of memory ({detail.rstrip('.')}); {then}")


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Autocast the forward pass to fp16/bf16 (trainable tensors stay fp32); a no-op for fp32."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=PRECISIONS[precision]):
        yield


def peak_memory(device: torch.device) -> str:
    """Peak memory so far: allocated GPU memory on CUDA, the process's max resident set on CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA peak allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"


def denoising_loss(unet: Callable[[Tensor, Tensor, Tensor], Tensor], schedule: NoiseSchedule, x0: Tensor,
                   context: Tensor, generator: torch.Generator, precision: str = "fp32") -> Tensor:
    """One Monte-Carlo sample of the denoising loss, noise and timestep from `generator` (a CPU generator).
    `unet(x_t, t, context)`: the UNet, or on SDXL the `VectorUNet` call of a packed embedding (imagic.conditioning)."""
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (b,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.training_target(x0, noise, t)
    with autocast(x0.device, precision):
        pred = unet(x_t, t, context.expand(b, -1, -1))
    return F.mse_loss(pred.float(), target.float())


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
        raise RunError(f"{path}: unreadable resume state ({reason}); delete it to restart this stage") from None


def _grads_finite(params: Sequence[Tensor]) -> bool:
    """Whether every gradient is finite, with one device sync: a sum is NaN or Inf as soon as one element is (inf
    plus -inf gives NaN). A finite sum that overflowed fp32 would be flagged too, rightly: such a gradient has
    blown up. One reduction per tensor is ~5x cheaper than isfinite().all() on hundreds of small tensors."""
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.stack([g.sum() for g in grads]).sum()))


def make_adam(params: List[Tensor], lr: float) -> torch.optim.Adam:
    """Adam; the fused implementation (one kernel for all tensors, ~3x faster on the CPU for a small UNet's few
    hundred tensors) when every parameter is an fp32 tensor on a device that has it."""
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def run_loop(stage: str, params: List[Tensor], loss_fn: Callable[[torch.Generator], Tensor], steps: int, lr: float,
             seed: int, resume_path: Optional[Path] = None, save_every: int = 50,
             callback: Optional[StepCallback] = None, progress: bool = True,
             on_save: Optional[Callable[[LoopState], None]] = None) -> LoopState:
    """Adam on `params` for `steps` steps of `loss_fn(generator)`.

    With `resume_path`, state is saved there every `save_every` steps (atomically) and, when the file exists at
    start, the loop continues from it: parameters, Adam moments and the RNG stream are restored, so the result equals
    an uninterrupted run. A non-finite loss or gradient raises NumericalError before the optimiser touches the
    parameters, so the saved state never holds the damage.
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
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(gen)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NumericalError(f"{stage}: loss is {value} at step {state.step + 1}; nothing was updated "
                                     "(try --precision fp32 or a lower learning rate; the run can be resumed)")
            loss.backward()
            if not _grads_finite(params):  # e.g. fp16 overflow in the backward pass: Adam would turn it into NaN
                raise NumericalError(f"{stage}: the gradient has inf or nan values at step {state.step + 1} (loss "
                                     f"{value:.4g}); nothing was updated (try --precision fp32 or bf16, or a lower "
                                     "learning rate; the run can be resumed)")
            opt.step()
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


@torch.no_grad()
def fixed_loss(unet: nn.Module, schedule: NoiseSchedule, x0: Tensor, context: Tensor, seed: int = 1234,
               n: int = 8, precision: str = "fp32") -> float:
    """The denoising loss averaged over a fixed set of (t, noise): a low-variance yardstick for tests and logs."""
    gen = torch.Generator().manual_seed(seed)
    return sum(float(denoising_loss(unet, schedule, x0, context, gen, precision)) for _ in range(n)) / n

