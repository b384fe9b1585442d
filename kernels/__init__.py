"""Fused ops used by the models, each with a pure-torch reference (the spec and the CPU path).

Installed as `imagic.kernels`. Every public op dispatches: a Triton kernel on CUDA when Triton is importable
and the shape is supported, the torch reference otherwise. `use_triton(False)` (or `IMAGIC_KERNELS=torch`)
forces the reference side for A/B runs; `use_triton(True)` (or `IMAGIC_KERNELS=triton`) forces Triton,
which also runs under `TRITON_INTERPRET=1` on the CPU for tests.
"""
from .dispatch import use_triton, triton_available, triton_enabled
from .attention import attention, attention_reference
from .group_norm import group_norm, group_norm_reference
from .layer_norm import layer_norm, layer_norm_reference
from .geglu import geglu, geglu_reference

__all__ = [
    "use_triton", "triton_available", "triton_enabled",
    "attention", "attention_reference",
    "group_norm", "group_norm_reference",
    "layer_norm", "layer_norm_reference",
    "geglu", "geglu_reference",
]
