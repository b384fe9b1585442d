"""Running the project's code on `meta` tensors as if on a CPU or a CUDA GPU: autocast and attention backends.

A `meta` tensor has a shape, a dtype and a storage size but no data, so the real models run on it in moments and
without memory (`imagic.plan` counts what they allocate). Two things a real device decides are lost on `meta`, and
`AsOnDevice` (a TorchFunctionMode) puts them back:

- **Autocast.** `torch.autocast` has no meta form. Inside `AsOnDevice.autocast()` the functions autocast would
  cast are given inputs cast as its policy for that device says (the lists of aten/src/ATen/autocast_mode.cpp,
  for the functions our models and steps call): matmuls, linears, convolutions and attention in the low
  precision; on CUDA also upsampling, norms, `exp`/`pow`/reductions and the losses in fp32 (on the CPU only the
  losses). Like autocast, a cast of an fp32 leaf that requires grad (LoRA or full fine-tuning weights) is cached
  until the outermost region ends. The backward pass recomputes checkpointed blocks under the forward's autocast
  state (torch.utils.checkpoint restores it), so casting stays on while autograd runs a backward; run it with
  `AsOnDevice.backward(loss)` (see there why not `loss.backward()`).
- **Attention backend.** `F.scaled_dot_product_attention` on `meta` takes the math path, which stores the
  Lq x Lk probabilities. A real device takes a fused kernel that never does: on the CPU
  `_scaled_dot_product_flash_attention_for_cpu` (saves out and logsumexp), on CUDA flash attention for fp16/bf16
  with head dim <= 256, else memory-efficient attention. `AsOnDevice` calls that kernel's aten op, whose meta
  implementation allocates what the real one returns.

Nothing else changes: every other op runs as written, in its inputs' dtype, as it would under autocast. With
`autocast()`, `backward(loss)` and `all_finite(values)` it is the `Device` the steps of `imagic.steps` take.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Optional, Set

import torch
import torch.nn.functional as F
from torch.autograd.graph import _engine_run_backward
from torch.overrides import TorchFunctionMode

_LOWER: Set[Callable] = {
    F.linear, torch.conv1d, torch.conv2d, torch.conv3d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
    torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.baddbmm, torch.addmm, torch.einsum,
    F.scaled_dot_product_attention,
}
_FP32_BOTH: Set[Callable] = {F.mse_loss, F.l1_loss, F.smooth_l1_loss}
_FP32_CUDA: Set[Callable] = _FP32_BOTH | {
    F.interpolate, F.layer_norm, F.group_norm, F.softplus, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log,
    torch.rsqrt, torch.Tensor.rsqrt, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.logsumexp,
    torch.softmax, torch.Tensor.softmax, F.softmax, F.log_softmax, torch.sum, torch.Tensor.sum, torch.cumsum,
    torch.Tensor.cumsum,
}
FP32_FUNCTIONS: Dict[str, Set[Callable]] = {"cuda": _FP32_CUDA, "cpu": _FP32_BOTH}
HALF = (torch.float16, torch.bfloat16)


class AsOnDevice(TorchFunctionMode):
    """Autocast (`dtype`, None for none) and the attention backend of `device_type` ("cpu" | "cuda") on meta
    tensors; see the module docstring. Use `with mode:` around the whole step and `with mode.autocast():`
    where the real code enters `torch.autocast`."""

    def __init__(self, device_type: str, dtype: Optional[torch.dtype] = None):
        super().__init__()
        if device_type not in FP32_FUNCTIONS:
            raise ValueError(f"device_type must be cpu or cuda, got {device_type!r}")
        self.device_type, self.dtype = device_type, dtype
        self._depth = 0
        self._cache: Dict[int, torch.Tensor] = {}

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Where `torch.autocast(device_type, dtype)` would be on; the weight-cast cache lives until it ends."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth:
                self._cache.clear()

    def _casting(self) -> bool:
        in_backward = torch._C._current_graph_task_id() != -1
        return self.dtype is not None and (self._depth > 0 or in_backward)

    def _cast(self, value: Any, to: torch.dtype, from_: tuple) -> Any:
        """autocast's `cached_cast`: floating tensors of the kinds in `from_` go to `to`, containers recursively."""
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, to, from_) for v in value)
        if not isinstance(value, torch.Tensor) or value.dtype not in from_ or value.dtype == to:
            return value
        cacheable = (to in HALF and value.dtype == torch.float32 and value.requires_grad and value.is_leaf
                     and not value._is_view() and self._depth > 0)
        if not cacheable:
            return value.to(to)
        if id(value) not in self._cache:
            self._cache[id(value)] = value.to(to)
        return self._cache[id(value)]

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if self._casting() and self.dtype is not None:
            if func in _LOWER:
                args, kwargs = self._cast(args, self.dtype, (torch.float32,)), {
                    k: self._cast(v, self.dtype, (torch.float32,)) for k, v in kwargs.items()}
            elif func in FP32_FUNCTIONS[self.device_type]:
                args, kwargs = self._cast(args, torch.float32, HALF), {
                    k: self._cast(v, torch.float32, HALF) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        return func(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()` for a scalar loss, with this mode on inside autograd's engine, where checkpointed
        blocks are recomputed and must be cast and routed as in the forward. Call it inside `with mode:`.

        Not `loss.backward()`: Tensor.backward and torch.autograd.backward first hand the call to the active
        mode, which is off while it handles a call, and the engine runs every node under the mode stack it found
        when called: an empty one. So the engine is called directly (torch's own entry point, private but what
        torch.autograd.backward calls after its checks)."""
        _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True,
                             accumulate_grad=True)

    def all_finite(self, values: torch.Tensor) -> bool:
        """A step's finiteness check (`steps.Device`): computed, so it allocates what it would on the device, and
        passed, since meta tensors hold no values to check."""
        torch.isfinite(values).all()
        return True

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                   **kwargs: Any) -> torch.Tensor:
        """The fused kernel the real device's SDPA picks for our calls (no mask, no dropout); math otherwise."""
        aten = torch.ops.aten
        plain = attn_mask is None and not dropout_p and not is_causal and not kwargs and q.dim() == 4
        if not (plain and q.is_meta):
            return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        if self.device_type == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[0]
        if q.dtype in HALF and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0:
            return aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[0]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return aten._scaled_dot_product_efficient_attention(q, k, v, None, grad, 0.0, False, scale=scale)[0]
