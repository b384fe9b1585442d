"""Compile one recorded Triton launch for a GPU target on a machine without a GPU, and read what ptxas made of it.

A launch recorded by `imagic.kernels.launch.recording` holds the kernel, its positional arguments (meta
tensors) and the meta-parameters. `bind` turns it, plus one candidate config, into exactly what Triton's own
launcher would compile on that GPU: the same signature, constexprs and the same specialisation attributes (pointer
alignment, integers divisible by 16 or equal to 1), so two launches that Triton would compile once share a `key`.
`compile_for` runs `triton.compile` for the target, with ptxas' verbose log captured, and reads the cubin with the
tools shipped inside the triton wheel:

- `cuobjdump --dump-resource-usage`: registers per thread, STACK (the local-memory frame; spilled registers live
  there) and LOCAL;
- ptxas `-v` log: bytes of spill stores and loads;
- `nvdisasm`: the tensor-core instructions (HMMA on sm_75-89, HGMMA, the wgmma form, on sm_90);
- Triton's metadata: the shared memory a block needs, to compare with the arch's opt-in maximum.

Must run without TRITON_INTERPRET (the interpreter replaces the compiler).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from imagic.kernels.launch import Config, GpuArch, Launch

_TOOLS = None


def tool(name: str) -> str:
    """Path of a CUDA binary tool that ships in the triton wheel (ptxas, cuobjdump, nvdisasm)."""
    global _TOOLS
    if _TOOLS is None:
        import triton
        _TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return str(_TOOLS / name)


@dataclasses.dataclass
class Variant:
    """One compilation: a kernel, its argument types and specialisation, and the config's meta-parameters."""
    kernel: str
    cc: int
    dtype: str        # the half dtype the launch was compiled with (or the input dtype for fp32 launches)
    config: Config    # the candidate config (tile sizes, num_warps, num_stages)
    constexprs: Dict[str, Any]
    source: Any       # the ASTSource to compile
    options: Dict[str, Any]

    @property
    def key(self) -> Tuple:
        # ASTSource.hash covers the source, signature, constexprs and specialisation attributes
        return self.kernel, self.cc, self.source.hash(), repr(sorted(self.config.items()))


@dataclasses.dataclass
class Compiled:
    """What ptxas made of a variant (sizes in bytes)."""
    registers: int = 0
    stack: int = 0
    local: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    mma: int = 0
    seconds: float = 0.0
    error: Optional[str] = None


_BINDERS: Dict[Tuple[int, int], Any] = {}


def _mock(t: Any, half: torch.dtype) -> Any:
    from triton.runtime.jit import MockTensor
    if not isinstance(t, torch.Tensor):
        return t
    return MockTensor(half if t.dtype in (torch.float16, torch.bfloat16) else t.dtype)


def bind(launch: Launch, config: Config, arch: GpuArch, half: torch.dtype) -> Variant:
    """The compilation Triton would do for `launch` with `config` on `arch`, fp16/bf16 tensors given dtype `half`
    (fp32 tensors stay fp32). Mock tensors have address 0, i.e. the 16-byte alignment real allocations have."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = launch.kernel.jit
    target = GPUTarget("cuda", arch.sm, 32)
    backend = make_backend(target)
    if (id(jit), arch.sm) not in _BINDERS:
        _BINDERS[(id(jit), arch.sm)] = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = {**launch.meta, **config}
    args = [_mock(a, half) for a in launch.args]
    bound, spec, options = _BINDERS[(id(jit), arch.sm)](*args, **kwargs)
    options, sig, constexprs, attrs = jit._pack_args(backend, kwargs, bound, spec, options)
    dtypes = {a.dtype for a in launch.args if isinstance(a, torch.Tensor)}
    name = str(half if dtypes & {torch.float16, torch.bfloat16} else torch.float32).replace("torch.", "")
    return Variant(launch.kernel.fn.__name__, arch.sm, name, dict(config), dict(launch.meta),
                   ASTSource(jit, sig, constexprs, attrs), options.__dict__)


def _resources(cubin: bytes) -> Dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([tool("nvdisasm"), f.name], capture_output=True, text=True, check=True).stdout
    found = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage)}
    # HMMA (mma.sync, sm_75-89) and HGMMA (wgmma, sm_90) with any shape/type suffix.
    mma = sum(1 for line in sass.splitlines() if re.search(r"\bH(G)?MMA\.", line))
    return dict(registers=found.get("REG", 0), stack=found.get("STACK", 0), local=found.get("LOCAL", 0), mma=mma)


def compile_for(variant: Variant) -> Compiled:
    """Compile for the variant's target (no GPU needed) and measure the result; errors are reported, not raised."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_for needs TRITON_INTERPRET unset (the interpreter replaces the compiler)")
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(variant.source, target=GPUTarget("cuda", variant.cc, 32),
                                    options=variant.options)
    except Exception as error:  # noqa: BLE001 (a kernel that does not compile is a finding, reported)
        return Compiled(seconds=time.perf_counter() - start, error=f"{type(error).__name__}: {error}"[:300])
    seconds = time.perf_counter() - start
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    return Compiled(**_resources(kernel.asm["cubin"]), shared=int(kernel.metadata.shared), seconds=seconds,
                    spill_stores=int(spills.group(1)) if spills else 0,
                    spill_loads=int(spills.group(2)) if spills else 0)


def problems(result: Compiled, arch: GpuArch, dot_kernel: bool) -> List[str]:
    """Why this compiled variant must not be launched on `arch` (empty when it is fine)."""
    if result.error:
        return [f"does not compile: {result.error}"]
    found = []
    if result.spill_stores or result.spill_loads or result.stack or result.local:
        found.append(f"spills ({result.spill_stores} B stores, {result.spill_loads} B loads, stack {result.stack} B)")
    if result.shared > arch.shared_memory:
        found.append(f"needs {result.shared // 1024} KB shared memory, {arch.name} has {arch.shared_memory // 1024} KB")
    if dot_kernel and result.mma == 0:
        found.append("no tensor-core instruction in a dot kernel")
    return found
