"""Before a GPU run: is the memory the device has free enough for the plan (`imagic.plan`)? If not, stop within
seconds with one line (what the stage needs, what is free, a setting that needs little enough) instead of running
out of memory minutes in. `force=True` (`--force`) skips the check.

What is compared: the plan counts everything a stage has on the device (weights, trainable tensors with gradients
and Adam state, activations, and the models and copies the editor holds beside it). Part of that is already there
when the check runs (the editor has loaded its models), so the stage still needs `plan - allocated` more, and may
take it from what the driver reports free plus what torch's caching allocator has reserved but not handed out.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from .gpus import GIB
from .plan import Plan

Replan = Callable[[Dict[str, object]], Plan]


class NotEnoughMemory(RuntimeError):
    """A stage the plan says will not fit the device's free memory; the message is one line."""


def device_memory(device: torch.device) -> Optional[Tuple[int, int]]:
    """(bytes a new allocation can get, bytes this process's tensors hold) on a CUDA device; None elsewhere (the
    CPU's memory is the operating system's to manage: swap, overcommit)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    return free + reserved - allocated, allocated


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2 ** 20:.1f} MiB"


def _worst(p: Plan, stages: Iterable[str]) -> Tuple[str, int]:
    name = max(stages, key=lambda s: p.stages[s].device_bytes)
    return name, p.stages[name].device_bytes


def alternatives(settings: Dict[str, object], bf16: bool) -> List[Tuple[str, Dict[str, object]]]:
    """Settings that need less memory than `settings`, one change at a time, then all of them together; as the
    command line spells them."""
    changes = []
    if settings["precision"] == "fp32":
        changes.append(("--precision bf16" if bf16 else "--precision fp16",
                        {"precision": "bf16" if bf16 else "fp16"}))
    if settings["finetune"] == "full":
        changes.append(("--finetune lora", {"finetune": "lora"}))
    if not settings["gradient_checkpointing"]:
        changes.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    if len(changes) > 1:
        changes.append((" ".join(c for c, _ in changes), {k: v for _, d in changes for k, v in d.items()}))
    return changes


def check(p: Plan, stages: Iterable[str], device: torch.device, replan: Replan) -> None:
    """Raise NotEnoughMemory when the most demanding of `stages` needs more than `device` has free. `replan(overrides)`
    plans the same edit with other settings, to find one that fits."""
    measured = device_memory(device)
    if measured is None:
        return
    free, allocated = measured
    stages = list(stages)
    name, need = _worst(p, stages)
    if need - allocated <= free:
        return
    bf16 = device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)
    hint = "no setting of precision, fine-tuning mode or gradient checkpointing makes it fit"
    for flag, overrides in alternatives(p.settings, bf16):
        other = _worst(replan(overrides), stages)[1]
        if other - allocated <= free:
            hint = f"{flag} would make it fit ({_size(other)})"
            break
    raise NotEnoughMemory(f"{name} needs {_size(need)} on {device} ({_size(allocated)} of it already allocated), "
                  f"{_size(free)} more is free; {hint}; --force runs anyway")
