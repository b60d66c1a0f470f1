"""The API process's forward threads: the wide thread (every core, a lone request), the lanes
(forwards side by side, each on its share of the cores: models/serving/lanes.py) and the
thread models load on. Each keeps its own torch thread count."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ftune.models.serving.lanes import LaneLayout

T = TypeVar("T")


def _keep_thread_count() -> None:
    import torch

    torch.set_num_threads(torch.get_num_threads())  # pinned here, before LOAD_THREAD lowers it


def openmp_threads(count: int) -> None:
    """A thread's initializer: torch kernels on it use ``count`` OpenMP threads (see
    below)."""
    import torch

    TORCH_THREAD.submit(int).result()  # the torch thread exists first and keeps its count
    torch.set_num_threads(count)


def one_openmp_thread() -> None:
    openmp_threads(1)


# Wide forwards run on this one thread, with every core. Each thread that runs torch's
# parallel CPU kernels gets an OpenMP team of its own, and two full teams on the same cores
# slow each other down for good (measured: forwards 2× slower once a model had been loaded on
# another thread); lane threads have teams of their share of the cores only.
TORCH_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch",
                                  initializer=_keep_thread_count)
# Models load here, off the forward thread (a load would stall every model's predictions),
# with one OpenMP thread: then no second team competes with the forwards (measured: forwards
# as fast as with loading on the torch thread).
LOAD_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-load",
                                 initializer=one_openmp_thread)


class ForwardLanes:
    """The process's forward threads for one lane layout: the wide thread (TORCH_THREAD) and
    ``layout.lanes`` lane threads (the wide thread itself where there is one lane)."""

    def __init__(self, layout: LaneLayout) -> None:
        self.layout = layout
        self.pool = TORCH_THREAD if layout.lanes == 1 else ThreadPoolExecutor(
            max_workers=layout.lanes, thread_name_prefix="lane", initializer=openmp_threads,
            initargs=(layout.threads,))
        self.busy = 0  # forwards of every model submitted and not done
        self._lock = threading.Lock()

    def run(self, wide: bool, work: Callable[[int], T]) -> asyncio.Future[T]:
        """``work(threads)`` on a lane, or with every core on the wide thread."""
        executor, threads = ((TORCH_THREAD, self.layout.wide_threads) if wide
                             else (self.pool, self.layout.threads))
        with self._lock:
            self.busy += 1
        done = asyncio.get_running_loop().run_in_executor(executor, work, threads)
        done.add_done_callback(self._finished)
        return done

    def _finished(self, _: object) -> None:
        with self._lock:
            self.busy -= 1


_lanes: dict[LaneLayout, ForwardLanes] = {}
_lanes_lock = threading.Lock()


def forward_lanes(layout: LaneLayout) -> ForwardLanes:
    """The process's lanes for ``layout``, made on first use."""
    with _lanes_lock:
        if layout not in _lanes:
            _lanes[layout] = ForwardLanes(layout)
        return _lanes[layout]
