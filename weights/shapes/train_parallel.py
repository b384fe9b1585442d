"""The data-parallel group of the shapes recipe: this process's rank among `--procs` gloo workers, and the few
collective operations training needs (one all-reduce of all gradients per step, sums of logged numbers, gathering
every process's random stream for a resumable state). A world of 1 makes each of them a no-op, so `--procs 1`
runs the same code without torch.distributed."""
from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.distributed as dist


class Group:
    """This process's place among the data-parallel workers (a world of 1 when there is only one)."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int, what: str) -> int:
        """This process's part of a global batch of n."""
        if n % self.world:
            raise SystemExit(f"{what} {n} does not split over {self.world} processes")
        return n // self.world

    def average_gradients(self, params: List[torch.nn.Parameter]) -> None:
        """Mean of every process's gradients, in one all-reduce of them all flattened (hundreds of small
        all-reduces would cost more than the step's maths). A parameter without a gradient counts as zeros."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        for p, part in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = part.view_as(p)

    def total(self, values: Dict[str, float]) -> Dict[str, float]:
        """Sums over the processes."""
        if self.world == 1:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64)
        dist.all_reduce(t)
        return dict(zip(values, t.tolist()))

    def average_logs(self, logged: Dict[str, float]) -> Dict[str, float]:
        return {k: v / self.world for k, v in self.total(logged).items()}

    def gather(self, obj: Any) -> List[Any]:
        """Every process's obj, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
