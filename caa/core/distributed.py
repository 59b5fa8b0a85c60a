"""Work shared by the processes of ``accelerate launch``: each runs its share of the batches, and every
process gets all the results back, in the order one process computes them.

The unit of work is a batch of the one-process plan (the same texts, padded the same way), so every
number a process computes is the number one process computes for that batch: the merged results
equal one process's. Batches go to the least loaded process, largest first (cost: rows x padded
length). A plan with fewer batches than processes is split in halves until every process has one (unless
the caller keeps its batches whole: greedy continuations, where a rounding difference could change
a token); only then do batches differ from one process's, and the numbers agree to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` processes, and how to collect what they computed:
    ``gather(items)`` returns every process's ``items``, concatenated in rank order."""

    rank: int = 0
    world: int = 1
    gather: Callable[[list[Any]], list[Any]] | None = None

    @classmethod
    def of(cls, accelerator: Any) -> Shard:
        """The shard of an ``accelerate.Accelerator`` (or ``PartialState``); one process: the whole."""
        if accelerator is None or accelerator.num_processes == 1:
            return cls()
        from accelerate.utils import gather_object

        return cls(accelerator.process_index, accelerator.num_processes, gather_object)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def take(
        self, batches: Sequence[list[int]], cost: Callable[[list[int]], float], split: bool = True
    ) -> list[list[int]]:
        """This process's batches of the plan ``batches`` (lists of item indices), in plan order;
        ``split=False`` keeps the plan's batches even when some processes then have none."""
        if self.world == 1:
            return list(batches)
        plan = [list(b) for b in batches]
        while split and len(plan) < self.world and any(len(b) > 1 for b in plan):
            big = max(range(len(plan)), key=lambda i: (len(plan[i]), -i))
            half = len(plan[big]) // 2
            plan[big : big + 1] = [plan[big][:half], plan[big][half:]]
        loads = [0.0] * self.world
        mine = []
        for i in sorted(range(len(plan)), key=lambda i: (-cost(plan[i]), i)):
            owner = min(range(self.world), key=lambda r: (loads[r], r))
            loads[owner] += cost(plan[i])
            if owner == self.rank:
                mine.append(i)
        return [plan[i] for i in sorted(mine)]

    def merge(self, items: list[T]) -> list[T]:
        """Every process's ``items`` (one process: its own), concatenated in rank order."""
        if self.world == 1 or self.gather is None:
            return items
        return list(self.gather(items))


ONE = Shard()
