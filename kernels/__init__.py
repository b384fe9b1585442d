"""Fused ops used by the models, each with a pure-torch reference (the spec and the CPU path).

Installed as `imagic.kernels`. Every public op dispatches: a Triton kernel on CUDA when Triton is importable
and the shape is supported, the torch reference otherwise. `use_triton(False)` (or `IMAGIC_KERNELS=torch`)
forces the reference side for A/B runs; `use_triton(True)` (or `IMAGIC_KERNELS=triton`) forces Triton,
which also runs on the CPU under `TRITON_INTERPRET=1` for tests. That variable must be set before anything
imports Triton (see dispatch.py); `interpreter_ready()` checks it. Each op's Triton path has a backward pass.
"""
from .dispatch import failed_ops, reset_failures, triton_available, triton_enabled, use_triton
from .launch import interpreter_ready
from .attention import attention, attention_reference
from .group_norm import group_norm, group_norm_reference
from .layer_norm import layer_norm, layer_norm_reference
from .geglu import geglu, geglu_reference

__all__ = [
    "use_triton", "triton_available", "triton_enabled", "interpreter_ready", "failed_ops", "reset_failures",
    "attention", "attention_reference",
    "group_norm", "group_norm_reference",
    "layer_norm", "layer_norm_reference",
    "geglu", "geglu_reference",
]
