"""Which devices this worker process trains on (``ftune worker --devices``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerDevices:
    """The devices a worker owns: CUDA ordinals as the machine numbers them, or CPU ranks."""

    kind: str  # "cuda" or "cpu"
    ids: tuple[int, ...] = (0,)

    @property
    def count(self) -> int:
        return len(self.ids)


ONE_DEVICE = WorkerDevices("cpu")
