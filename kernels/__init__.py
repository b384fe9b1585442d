"""Fused ops used by the models, each with a pure-torch reference (the spec and the CPU path).

Installed as `imagic.kernels`. Every public op dispatches: a Triton kernel on CUDA when Triton is importable
and the shape is supported, the torch reference otherwise. `use_triton(False)` (or `IMAGIC_KERNELS=torch` at
start-up) forces the reference side for A/B runs; `use_triton(True)` (or `IMAGIC_KERNELS=triton`) forces Triton,
which also runs on the CPU under `TRITON_INTERPRET=1` for tests. That variable must be set before anything
imports Triton (see dispatch.py); `interpreter_ready()` checks it. Each op's Triton path has a backward pass.

This folder is also a top-level `kernels` package to a Python started in the repository root (the root comes
first on sys.path), where it would stand in for the `kernels` distribution that transformers imports. So when it
is imported under that name it hands over (`_standin.py`): it loads the installed `kernels` in its place, or fails
as if this folder were not there, and defines nothing of its own.
"""
if __name__ == "kernels":  # imported as top-level `kernels` from the repository root
    from ._standin import hand_over
    hand_over(__file__)
else:
    from .dispatch import (CHOICES, failed_ops, reset_failures, resolve, triton_available, triton_enabled,
                           use_setting, use_triton)
    from .launch import interpreter_ready
    from .attention import attention, attention_reference
    from .group_norm import group_norm, group_norm_reference
    from .layer_norm import layer_norm, layer_norm_reference
    from .geglu import geglu, geglu_reference

    __all__ = [
        "CHOICES", "use_triton", "use_setting", "resolve", "triton_available", "triton_enabled", "interpreter_ready",
        "failed_ops", "reset_failures",
        "attention", "attention_reference",
        "group_norm", "group_norm_reference",
        "layer_norm", "layer_norm_reference",
        "geglu", "geglu_reference",
    ]
