"""How a Triton kernel is built and launched: lazily, on configs that fit the GPU, or recorded instead of run.

`triton_kernel` replaces `@triton.jit` in this package: the kernel is built at its first launch, so the
modules import (and the torch paths work) without Triton, and one kernel can autotune on a GPU yet use a fixed
configuration under the interpreter, where `@triton.autotune` fails (it needs a GPU driver to benchmark).

A config that does not fit the GPU is never launched. Before a kernel runs on a GPU, every candidate config is
compiled for it and dropped if it needs more shared memory than a block may have, or if ptxas spilled registers to
local memory (slow, and a sign the tile is too big for this architecture). Autotuning then chooses among the rest;
when nothing is left the launch raises `KernelDoesNotFit`, which the op turns into its torch path
(`dispatch.with_fallback`). `benchmarks/kernel_compile.py` checks the same thing on a CPU for every launch the
models make, on every target in `TARGETS`.

`recording(arch)` is how that check sees the launches: inside it, the ops accept tensors on the `meta` device and
each launch is appended to a list instead of running, with its arguments, meta-parameters and candidate configs,
while the launchers size their work for `arch`. Running the real models on `meta` tensors under it yields exactly
the launches they make, with no memory and no GPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

Config = Dict[str, Any]  # meta-parameters plus optional num_warps / num_stages, e.g. dict(BLOCK=1024, num_warps=4)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_ready() -> bool:
    """True when Triton was imported under TRITON_INTERPRET=1, so kernels really can run on the CPU (a flag set
    after `import triton` leaves Triton's own library compiled-only, and kernels fail inside `tl.sum` & co)."""
    if not interpreting():
        return False
    try:
        import triton.language.standard as standard
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(standard.zeros, InterpretedFunction)


def cdiv(a: int, b: int) -> int:
    """Ceiling division (number of blocks of size b covering a)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (tile sizes must be powers of two)."""
    return 1 << max(n - 1, 0).bit_length()


# ------------------------------------------------------------------------------------------------ the GPU

@dataclasses.dataclass(frozen=True)
class GpuArch:
    """What the launchers need to know of the GPU they launch on."""
    capability: Tuple[int, int]  # compute capability, e.g. (8, 6)
    shared_memory: int           # bytes of shared memory one block may use (the opt-in maximum)
    multiprocessors: int         # SMs, to size grids so that small problems still fill the GPU
    name: str

    @property
    def sm(self) -> int:
        return self.capability[0] * 10 + self.capability[1]

    def supports(self, dtype: torch.dtype) -> bool:
        """bf16 arithmetic and bf16 tensor-core MMAs need sm_80 (Ampere) or newer."""
        return dtype != torch.bfloat16 or self.capability >= (8, 0)

    @property
    def tensor_core_dots(self) -> bool:
        """Whether Triton lowers `tl.dot` to tensor-core MMAs here: from sm_80. For sm_75 triton 3.8 emits FMA
        loops (a 64x64 fp16 dot compiles to 2048 `fma` and no `mma` in the PTX; benchmarks/results/kernel_compile.md:
        every attention config spills there), so the attention kernels would lose to cuDNN/SDPA on a T4."""
        return self.capability >= (8, 0)


# The targets the compile check covers. Shared memory per block: CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability" (64 KB on 7.5, 163 KB on 8.0, 99 KB on 8.6 and 8.9, 227 KB on 9.0);
# SM counts of the named cards (T4 40, A100 108, RTX 3090 82, RTX 4090 128, H100 SXM 132).
TARGETS: Dict[int, GpuArch] = {
    75: GpuArch((7, 5), 64 * 1024, 40, "T4"),
    80: GpuArch((8, 0), 163 * 1024, 108, "A100"),
    86: GpuArch((8, 6), 99 * 1024, 82, "RTX 3090 / A10"),
    89: GpuArch((8, 9), 99 * 1024, 128, "RTX 4090 / L4"),
    90: GpuArch((9, 0), 227 * 1024, 132, "H100 / H200"),
}
_INTERPRETER = GpuArch((8, 0), 163 * 1024, 4, "Triton interpreter (CPU)")


@dataclasses.dataclass
class Launch:
    """One recorded launch: the kernel, its positional arguments (tensors on `meta`), the meta-parameters given
    at the call and the candidate configs it would autotune over."""
    kernel: "TritonKernel"
    args: Tuple[Any, ...]
    meta: Config
    configs: List[Config]


_recording: Optional[Tuple[GpuArch, List[Launch]]] = None


@contextlib.contextmanager
def recording(arch: GpuArch) -> Iterator[List[Launch]]:
    """Record launches instead of running them, as if on `arch`; the ops take `meta` tensors (see the docstring)."""
    global _recording
    previous, _recording = _recording, (arch, [])
    try:
        yield _recording[1]
    finally:
        _recording = previous


def is_recording() -> bool:
    return _recording is not None


def gpu_arch(device: torch.device) -> GpuArch:
    """The GPU a launch runs on (or the recording's target; a stand-in under the interpreter)."""
    if _recording is not None:
        return _recording[0]
    if device.type != "cuda":
        return _INTERPRETER
    props = torch.cuda.get_device_properties(device)
    return GpuArch((props.major, props.minor), props.shared_memory_per_block_optin, props.multi_processor_count,
                   props.name)


# ------------------------------------------------------------------------------------- fitting configs

class KernelDoesNotFit(RuntimeError):
    """No candidate config of a kernel compiles to something this GPU can run without spilling."""


def resource_problem(compiled: Any) -> Optional[str]:
    """Why a compiled kernel must not run on the current GPU (None if it may).

    Loading the binary (`compiled.run`) raises Triton's OutOfResources when the kernel needs more shared memory
    or threads than a block may have; ptxas' spill count is known once it is loaded.
    """
    from triton.runtime.errors import OutOfResources
    try:
        compiled.run  # noqa: B018 (the property loads the binary and checks its resources)
    except OutOfResources as error:
        return str(error)
    spills = getattr(compiled, "n_spills", 0)
    return f"{spills} spilled registers" if spills else None


class TritonKernel:
    """A Triton kernel built at its first launch: `kernel(grid, *args, configs=[...], **meta)`.

    On a GPU, `configs` (a sequence of Config dicts) are autotuned on the argument names in `key`, after
    dropping the ones that do not fit (see the module docstring); a single config is checked the same way. Under
    the interpreter they are replaced by the fixed `interpret` config: small tiles, so the CPU tests exercise
    several blocks and the ragged tails.
    """

    def __init__(self, fn: Callable, key: Sequence[str], interpret: Config):
        self.fn = fn
        self.key = list(key)
        self.interpret = interpret
        self._jit: Any = None
        self._tuned: Dict[str, Any] = {}
        self._checked: Dict[Any, Optional[str]] = {}  # specialisation of a single config -> why it cannot run

    def __repr__(self) -> str:
        return f"TritonKernel({self.fn.__name__})"

    @property
    def jit(self) -> Any:
        """The `triton.jit` function (built on first use; under the interpreter an interpreted function)."""
        if self._jit is None:
            if interpreting() and not interpreter_ready():
                raise RuntimeError("TRITON_INTERPRET=1 was set after `import triton`; set it before anything "
                                   "imports Triton (see imagic.kernels.launch)")
            import triton
            self._jit = triton.jit(self.fn)
        return self._jit

    def _fitting(self, configs: List[Any], named_args: Dict[str, Any], **kwargs: Any) -> List[Any]:
        """Autotuning's `early_config_prune`: the configs whose compiled kernel fits the current GPU."""
        kept = [c for c in configs if self._problem(named_args, {**kwargs, **c.all_kwargs()}) is None]
        if not kept:
            raise KernelDoesNotFit(f"{self.fn.__name__}: none of {len(configs)} configs fits this GPU "
                                   f"({self._problem(named_args, {**kwargs, **configs[0].all_kwargs()})})")
        return kept

    def _problem(self, named_args: Dict[str, Any], meta: Config) -> Optional[str]:
        """Compile (no launch) and say why the result cannot run here, if it cannot."""
        compiled = self.jit.warmup(grid=(1,), **named_args, **meta)
        return resource_problem(compiled)

    def _autotuned(self, configs: Sequence[Config]) -> Any:
        cache_key = repr(list(configs))
        if cache_key not in self._tuned:
            import triton
            tuned = [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                                   num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 3))
                     for c in configs]
            self._tuned[cache_key] = triton.autotune(tuned, key=self.key,
                                                     prune_configs_by={"early_config_prune": self._fitting})(self.jit)
        return self._tuned[cache_key]

    def _check_single(self, args: Tuple[Any, ...], meta: Config) -> None:
        """A single config is not autotuned, so it is checked here, once per dtype signature and meta values."""
        key = (tuple(a.dtype for a in args if isinstance(a, torch.Tensor)), tuple(sorted(meta.items())))
        if key not in self._checked:
            names = self.jit.arg_names[:len(args)]
            self._checked[key] = self._problem(dict(zip(names, args)), meta)
        if self._checked[key] is not None:
            raise KernelDoesNotFit(f"{self.fn.__name__}: {self._checked[key]}")

    def __call__(self, grid: Any, *args: Any, configs: Sequence[Config], **meta: Any) -> None:
        if _recording is not None:
            _recording[1].append(Launch(self, args, dict(meta), [dict(c) for c in configs]))
            return
        if interpreting():
            self.jit[grid](*args, **meta, **self.interpret)
            return
        # Triton launches on the current device, not the tensors' one (cuda:1 tensors while cuda:0 is current
        # would be an illegal memory access).
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with torch.cuda.device(device):
            if len(configs) == 1:
                self._check_single(args, {**meta, **configs[0]})
                self.jit[grid](*args, **meta, **configs[0])
            else:
                self._autotuned(configs)[grid](*args, **meta)


def triton_kernel(key: Sequence[str] = (), interpret: Optional[Config] = None) -> Callable[[Callable], TritonKernel]:
    """Decorator used instead of `@triton.jit` (see the module docstring for why): `key` names the arguments
    autotuning is keyed on, `interpret` the fixed meta-parameters used under the interpreter."""
    def wrap(fn: Callable) -> TritonKernel:
        return TritonKernel(fn, key, interpret or {})
    return wrap
