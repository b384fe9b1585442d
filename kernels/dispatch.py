"""Whether to run the Triton kernels or the torch references, and how a Triton kernel is launched.

Default: Triton when it is importable and the tensors live on CUDA. The env var `IMAGIC_KERNELS`
(`triton` | `torch` | `auto`) and the context manager `use_triton(...)` override that for A/B runs and
for the CPU interpreter tests (`TRITON_INTERPRET=1`).

`triton_kernel` replaces `@triton.jit` in this package: the kernel is built at its first launch, so the
modules import (and the torch paths work) without Triton, and one kernel can autotune on a GPU yet use a fixed
configuration under the interpreter, where `@triton.autotune` fails (it needs a GPU driver to benchmark).

The interpreter is a process-wide choice: Triton reads TRITON_INTERPRET when it decorates a function, and it
decorates its own library (`tl.sum`, `tl.zeros`, ... in triton/language/standard.py) when `triton` is first
imported, which diffusers and transformers already do through torch. Set the variable before anything imports
Triton (tests/conftest.py does so on machines without CUDA); `interpreter_ready()` checks that it worked.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import torch

_forced: Optional[bool] = None


def triton_available() -> bool:
    """True when `import triton` would succeed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_ready() -> bool:
    """True when Triton was imported under TRITON_INTERPRET=1, so kernels really can run on the CPU (a flag set
    after `import triton` leaves Triton's own library compiled-only, and kernels fail inside `tl.sum` & co)."""
    if not (interpreting() and triton_available()):
        return False
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(standard.zeros, InterpretedFunction)


@contextlib.contextmanager
def use_triton(enabled: Optional[bool]) -> Iterator[None]:
    """Force Triton on (True), off (False), or back to automatic (None) inside the block."""
    global _forced
    previous, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = previous


def triton_enabled(*tensors: torch.Tensor) -> bool:
    """Decide for one call: the forced setting, else the env var, else 'CUDA tensors and Triton present'."""
    if not triton_available():
        return False
    choice = _forced
    if choice is None:
        env = os.environ.get("IMAGIC_KERNELS", "auto").lower()
        if env in ("triton", "1", "on"):
            choice = True
        elif env in ("torch", "0", "off"):
            choice = False
    if choice is False:
        return False
    on_device = all(t.is_cuda for t in tensors) or (interpreting() and all(t.device.type == "cpu" for t in tensors))
    if choice is True:
        return on_device
    return all(t.is_cuda for t in tensors)


def cdiv(a: int, b: int) -> int:
    """Ceiling division (number of blocks of size b covering a)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (tile sizes must be powers of two)."""
    return 1 << max(n - 1, 0).bit_length()


def multiprocessor_count(device: torch.device) -> int:
    """Number of SMs, used to size grids so that small problems still fill the GPU (a guess off CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


Config = Dict[str, Any]  # meta-parameters plus optional num_warps / num_stages, e.g. dict(BLOCK=1024, num_warps=4)


class TritonKernel:
    """A Triton kernel built at its first launch: `kernel(grid, *args, configs=[...], **meta)`.

    On a GPU, `configs` (a sequence of Config dicts) are autotuned on the argument names in `key` (a single
    config is used as is). Under the interpreter they are replaced by the fixed `interpret` config: small
    tiles, so the CPU tests exercise several blocks and the ragged tails.
    """

    def __init__(self, fn: Callable, key: Sequence[str], interpret: Config):
        self.fn = fn
        self.key = list(key)
        self.interpret = interpret
        self._built: Dict[Any, Any] = {}

    def __repr__(self) -> str:
        return f"TritonKernel({self.fn.__name__})"

    def _build(self, configs: Optional[Sequence[Config]]) -> Any:
        cache_key = None if configs is None else repr(list(configs))
        if cache_key not in self._built:
            if interpreting() and not interpreter_ready():
                raise RuntimeError("TRITON_INTERPRET=1 was set after `import triton`; set it before anything "
                                   "imports Triton (see imagic.kernels.dispatch)")
            import triton
            kernel = triton.jit(self.fn)
            if configs is not None:
                tuned = [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                                       num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 3))
                         for c in configs]
                kernel = triton.autotune(tuned, key=self.key)(kernel)
            self._built[cache_key] = kernel
        return self._built[cache_key]

    def __call__(self, grid: Any, *args: Any, configs: Sequence[Config], **meta: Any) -> None:
        if interpreting():
            self._build(None)[grid](*args, **meta, **self.interpret)
            return
        # Triton launches on the current device, not the tensors' one (cuda:1 tensors while cuda:0 is current
        # would be an illegal memory access).
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with torch.cuda.device(device):
            if len(configs) == 1:
                self._build(None)[grid](*args, **meta, **configs[0])
            else:
                self._build(configs)[grid](*args, **meta)


def triton_kernel(key: Sequence[str] = (), interpret: Optional[Config] = None) -> Callable[[Callable], TritonKernel]:
    """Decorator used instead of `@triton.jit` (see the module docstring for why): `key` names the arguments
    autotuning is keyed on, `interpret` the fixed meta-parameters used under the interpreter."""
    def wrap(fn: Callable) -> TritonKernel:
        return TritonKernel(fn, key, interpret or {})
    return wrap
