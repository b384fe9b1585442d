"""Whether an op runs its Triton kernel or its torch reference, and what happens when the kernel fails.

Default: Triton when it is importable and the tensors live on a CUDA GPU that supports their dtype (bf16 needs
sm_80). The context manager `use_triton(...)` overrides that for A/B runs and for the CPU interpreter tests
(`TRITON_INTERPRET=1`); the editor enters its `kernels` setting once per call (`use_setting`). The environment
variable `IMAGIC_KERNELS` (`triton` | `torch` | `auto`) is the user's override of the automatic choice, read once
when this module is first imported (`STARTUP_CHOICE`), not at every op.

A Triton kernel that fails to compile or launch on a user's GPU (an architecture Triton does not support, out of
shared memory, a Triton/driver mismatch, no config that fits) must not end an edit: `with_fallback` catches
the error, switches that op to its torch path for the rest of the process and warns once, naming the op, the GPU
and the reason. The result is the torch path's, so it differs from the kernel's only by rounding. An out-of-memory
error is not caught (the torch path needs the memory too), nor is anything under `use_triton(True, strict=True)`
(or IMAGIC_KERNELS_STRICT=1), which the kernel tests and benchmarks use so that a broken kernel cannot hide.

The interpreter is a process-wide choice: Triton reads TRITON_INTERPRET when it decorates a function, and it
decorates its own library (`tl.sum`, `tl.zeros`, ... in triton/language/standard.py) when `triton` is first
imported, which diffusers and transformers already do through torch. Set the variable before anything imports
Triton (tests/conftest.py does so on machines without CUDA); `interpreter_ready()` checks that it worked.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import warnings
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch

from .launch import gpu_arch, interpreting, is_recording

logger = logging.getLogger(__name__)
T = TypeVar("T")

_forced: Optional[bool] = None
_strict: bool = False
_failed: Dict[str, str] = {}  # op -> why its Triton path was switched off

_CHOICES = {"auto": None, "triton": True, "torch": False}  # a `kernels` setting -> what use_triton gets
CHOICES = tuple(_CHOICES)
_ALIASES = {"1": "triton", "on": "triton", "0": "torch", "off": "torch"}


def environment_choice() -> str:
    """`IMAGIC_KERNELS` as one of auto, triton, torch (1/on and 0/off are accepted too; anything else is auto)."""
    value = os.environ.get("IMAGIC_KERNELS", "auto").lower()
    value = _ALIASES.get(value, value)
    return value if value in _CHOICES else "auto"


STARTUP_CHOICE = environment_choice()  # the user's override, read once at start-up


def _check_setting(setting: str) -> None:
    if setting not in _CHOICES:
        raise ValueError(f"kernels must be one of {', '.join(_CHOICES)}, got {setting!r}")


def triton_available() -> bool:
    """True when `import triton` would succeed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


@contextlib.contextmanager
def use_triton(enabled: Optional[bool], strict: bool = False) -> Iterator[None]:
    """Force Triton on (True), off (False), or back to automatic (None) inside the block. `strict=True` lets a
    failing kernel raise instead of falling back to the torch path."""
    global _forced, _strict
    previous = _forced, _strict
    _forced, _strict = enabled, strict
    try:
        yield
    finally:
        _forced, _strict = previous


def use_setting(setting: str) -> ContextManager[None]:
    """The editor's `kernels` setting entered: `use_triton(True)` for "triton", `use_triton(False)` for "torch";
    nothing for "auto", which leaves the choice to an enclosing `use_triton`, else `IMAGIC_KERNELS` as read at
    start-up, else the automatic rule."""
    _check_setting(setting)
    choice = _CHOICES[setting]
    return contextlib.nullcontext() if choice is None else use_triton(choice)


def resolve(setting: str) -> str:
    """What a `kernels` setting (auto | triton | torch) comes to here, in the same order `triton_enabled` decides:
    an explicit setting, else an enclosing `use_triton`, else the start-up override, else "auto"."""
    _check_setting(setting)
    if setting != "auto":
        return setting
    if _forced is not None:
        return "triton" if _forced else "torch"
    return STARTUP_CHOICE


def _strict_mode() -> bool:
    return _strict or os.environ.get("IMAGIC_KERNELS_STRICT", "0") == "1"


def failed_ops() -> Dict[str, str]:
    """The ops whose Triton path failed in this process and now run on torch, with the reason."""
    return dict(_failed)


def reset_failures() -> None:
    """Give every op's Triton path another chance (after a driver upgrade in a notebook, or between tests)."""
    _failed.clear()


def triton_enabled(op: str, *tensors: torch.Tensor) -> bool:
    """Decide for one call of `op`: not if its kernel failed before; else the forced setting, else the start-up
    override, else 'CUDA tensors, Triton present and the dtype supported by this GPU'."""
    if is_recording():  # launches are being listed for a target GPU (launch.recording): meta tensors only
        return all(t.device.type == "meta" and gpu_arch(t.device).supports(t.dtype) for t in tensors)
    if not triton_available() or op in _failed:
        return False
    choice = _forced if _forced is not None else _CHOICES[STARTUP_CHOICE]
    if choice is False:
        return False
    if choice is True and interpreting() and all(t.device.type == "cpu" for t in tensors):
        return True
    if not all(t.is_cuda for t in tensors):
        return False
    arch = gpu_arch(tensors[0].device)
    return all(arch.supports(t.dtype) for t in tensors)


def _gpu_name(tensors: Sequence[torch.Tensor]) -> str:
    cuda = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda]
    if not cuda:
        return "the CPU (Triton interpreter)"
    arch = gpu_arch(cuda[0].device)
    return f"{arch.name} (sm_{arch.sm})"


def disable(op: str, error: BaseException, tensors: Sequence[torch.Tensor] = ()) -> None:
    """Switch `op` to its torch path for the rest of the process, with one warning that says why."""
    if op in _failed:
        return
    # Triton's CompilationError starts with the source position; its `error_message` says what went wrong.
    text = str(getattr(error, "error_message", None) or error).strip()
    reason = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
    _failed[op] = reason[:300]
    message = (f"imagic.kernels: the Triton {op} kernel failed on {_gpu_name(tensors)} ({_failed[op]}); "
               f"{op} runs on the torch path for the rest of this process")
    logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def with_fallback(op: str, tensors: Sequence[torch.Tensor], triton_fn: Callable[[], T],
                  torch_fn: Callable[[], T]) -> T:
    """triton_fn(), or, if it raises (see the module docstring), torch_fn() after `disable(op, ...)`."""
    try:
        return triton_fn()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 (any failure of the kernel path; the torch path is the spec)
        if _strict_mode():
            raise
        disable(op, error, tensors)
        return torch_fn()


def reference_vjp(reference: Callable[..., torch.Tensor], inputs: Sequence[Optional[torch.Tensor]],
                  needs: Sequence[bool], grad_output: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
    """The gradients of `reference(*inputs)` for `grad_output`, by autograd: a Triton backward's fallback.

    Returns one entry per input, None where `needs` is False (or the input is None).
    """
    with torch.enable_grad():
        leaves: List[Optional[torch.Tensor]] = [
            None if t is None else t.detach().requires_grad_(bool(n) and t.is_floating_point())
            for t, n in zip(inputs, needs)]
        out = reference(*leaves)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_output) if wanted else ())
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in leaves)


def backward_with_fallback(op: str, triton_fn: Callable[[], Tuple[Optional[torch.Tensor], ...]],
                           reference: Callable[..., torch.Tensor], inputs: Sequence[Optional[torch.Tensor]],
                           needs: Sequence[bool], grad_output: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
    """A Triton backward, or the reference's gradients by autograd if it fails (and `op` is switched off)."""
    tensors = [t for t in inputs if t is not None]
    return with_fallback(op, tensors, triton_fn, lambda: reference_vjp(reference, inputs, needs, grad_output))
