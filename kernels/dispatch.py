"""Whether to run the Triton kernels or the torch references.

Default: Triton when it is importable and the tensors live on CUDA. The env var `IMAGIC_KERNELS`
(`triton` | `torch` | `auto`) and the context manager `use_triton(...)` override that for A/B runs and
for the CPU interpreter tests (`TRITON_INTERPRET=1`)."""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator, Optional

import torch

_forced: Optional[bool] = None


def triton_available() -> bool:
    """True when `import triton` would succeed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
