"""The free workers the dispatcher may admit jobs to, by device count, and best fit.

A live worker is busy while a running job names it (``Job.worker`` is "NODE:pid"). An
admitted job has no worker yet, and a running job may name one whose key is gone (it died;
the reconciler will queue the job again): each of those holds, conservatively, the smallest
free worker it fits, as it may be taken there any moment.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ftune.service.lifecycle.liveness import LiveWorker, worker_node


@dataclass
class FreeWorkers:
    devices: list[int] = field(default_factory=list)  # of each free worker, ascending

    def fits(self, need: int) -> bool:
        return bool(self.devices) and self.devices[-1] >= need

    def take(self, need: int) -> bool:
        """Best fit: the smallest free worker with at least ``need`` devices, so a one-device
        job leaves the eight-GPU worker to a job that needs it."""
        at = bisect.bisect_left(self.devices, need)
        if at == len(self.devices):
            return False
        del self.devices[at]
        return True


def free_workers(workers: Sequence[LiveWorker],
                 occupying: Iterable[tuple[str | None, int]]) -> FreeWorkers:
    """``occupying``: (``Job.worker`` of a running job, None for an admitted one; its device
    need) for every job on a worker or about to be."""
    live = {w.node for w in workers}
    busy: set[str] = set()
    placed_later: list[int] = []
    for worker, need in occupying:
        node = worker_node(worker)
        if node in live:
            busy.add(node)
        else:
            placed_later.append(need)
    pool = FreeWorkers(sorted(w.devices for w in workers if w.node not in busy))
    for need in sorted(placed_later, reverse=True):  # the hardest to place first
        pool.take(need)  # one that fits no free worker waits for a busy one: holds none
    return pool


def device_hold(need: int, workers: Sequence[LiveWorker]) -> str | None:
    """Why a job waits that no live worker could run, or None. Only jobs that ask for
    several devices: any worker runs the others."""
    largest = max((w.devices for w in workers), default=0)
    if need <= 1 or need <= largest:
        return None
    have = f"live workers have at most {largest}" if workers else "no worker is live"
    return f"waiting for a worker with {need} devices ({have})"
