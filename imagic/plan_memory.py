"""Counting the bytes a step holds: a TorchDispatchMode that follows every tensor storage from birth to death.

`StorageTracker` sees each aten op after autograd, so it sees what the forward saves for the backward, the
gradients, the optimizer's state and the casts autocast inserts. A storage is born when an op returns a tensor
whose storage it has not seen (views, in-place ops and `.detach()` share their input's storage and add nothing)
and dies when its last reference goes: a weak reference to the storage object, which PyTorch keeps unique per
storage, calls back at that moment, whether the last reference was a Python tensor, a view or a tensor autograd
saved. Live bytes after every op give the peak; tensors that exist before the step are registered with
`add_resident`, so the peak is "resident + the highest net allocation during the step", the accounting of
benchmarks/imagic_step.py. Each storage keeps a label ("weights", "trainable" for parameters that train, their
gradients and Adam state, anything else "activations"), so the peak splits into those parts.

What it cannot see: memory a kernel allocates and frees inside one op (workspaces), which never reaches Python.
On the CPU that is small next to the activations (tests/test_plan.py measures it against torch.profiler, which
sees the allocator itself); on CUDA, cuBLAS and cuDNN workspaces live outside the caching allocator's tensors.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

LABELS = ("weights", "trainable", "activations")


@dataclasses.dataclass
class _Storage:
    nbytes: int
    label: str
    born: int
    died: Optional[int] = None


class StorageTracker(TorchDispatchMode):
    """Live and peak bytes of the storages on `device_type` (None: every device) while the mode is active.
    `before_op` is called before each op runs (`plan_steps` drops recorded kernel launches there, which would
    otherwise keep every tensor a kernel saw alive)."""

    def __init__(self, device_type: Optional[str] = None, before_op: Optional[Callable[[], None]] = None):
        super().__init__()
        self.device_type = device_type
        self.before_op = before_op
        self.clock = 0          # ops seen so far
        self.live = 0           # bytes alive now
        self.peak = 0
        self.peak_clock = 0
        self._storages: List[_Storage] = []
        self._index: Dict[int, int] = {}               # id(storage object) -> index in _storages
        self._refs: Dict[int, weakref.ReferenceType] = {}

    def _see(self, t: torch.Tensor, label: str) -> None:
        if self.device_type is not None and t.device.type != self.device_type:
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage (sparse, nested, ...)
            return
        key = id(storage)
        if key in self._index or storage.nbytes() == 0:
            return
        self._index[key] = len(self._storages)
        self._storages.append(_Storage(storage.nbytes(), label, self.clock))
        self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._died(key))
        self.live += storage.nbytes()
        if self.live > self.peak:
            self.peak, self.peak_clock = self.live, self.clock

    def _died(self, key: int) -> None:
        record = self._storages[self._index.pop(key)]
        del self._refs[key]
        record.died = self.clock
        self.live -= record.nbytes

    def add_resident(self, tensors: Iterable[Optional[torch.Tensor]], label: str) -> None:
        """Tensors alive before the step (weights, inputs, ...); a storage already seen keeps its first label."""
        for t in tensors:
            if t is not None:
                self._see(t, label)

    def relabel(self, tensors: Iterable[Optional[torch.Tensor]], label: str) -> None:
        """Give a label to storages born during the step, found afterwards (gradients, optimizer state)."""
        for t in tensors:
            if t is not None:
                index = self._index.get(id(t.untyped_storage()))
                if index is not None:
                    self._storages[index].label = label

    def at_peak(self) -> Dict[str, int]:
        """Bytes per label alive at the (first) peak."""
        out = dict.fromkeys(LABELS, 0)
        for s in self._storages:
            # Frees between op c and op c + 1 carry clock c: those storages were still alive right after op c.
            if s.born <= self.peak_clock and (s.died is None or s.died >= self.peak_clock):
                out[s.label] += s.nbytes
        return out

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        if self.before_op is not None:
            self.before_op()
        out = func(*args, **(kwargs or {}))
        self.clock += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t, "activations")
        return out
