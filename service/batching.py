"""Dynamic batching: concurrent predict requests for one model share a forward pass, whichever
engine runs it (torch or ONNX Runtime: service/serving.py).

A request's images wait for peers only while other requests for the same model are on their
way (being received or decoded), and then at most ``max_wait_ms``; a lone request goes
straight through. Forwards run one at a time on the process's torch thread, never on the
event loop; requests arriving during a forward form the next batch. A forward takes at most
the images its engine runs fastest at (``Predictor.batch_size``, measured on this host) and
answers them as soon as it ends: on a CPU, two forwards of 8 beat one of 16 (eager lite0 at
224 px: 94 against 67 images/s), and their first half need not wait for the second.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch loads with the first model, never with the API itself
    import torch

    from ftune.models.predictor import Predictor



def _keep_thread_count() -> None:
    import torch

    torch.set_num_threads(torch.get_num_threads())  # pinned here, before LOAD_THREAD lowers it


def one_openmp_thread() -> None:
    """A thread's initializer: torch kernels on it use one OpenMP thread (see below)."""
    import torch

    TORCH_THREAD.submit(int).result()  # the torch thread exists first and keeps its count
    torch.set_num_threads(1)


# Forwards run on this one thread. Each thread that runs torch's parallel CPU kernels gets an
# OpenMP team of its own, and two full teams on the same cores slow each other down for good
# (measured: forwards 2× slower once a model had been loaded on another thread).
TORCH_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch",
                                  initializer=_keep_thread_count)
# Models load here, off the forward thread (a load would stall every model's predictions),
# with one OpenMP thread: then no second team competes with the forwards (measured: forwards
# as fast as with loading on the torch thread).
LOAD_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-load",
                                 initializer=one_openmp_thread)


@dataclass
class _Item:
    batch: np.ndarray  # uint8 [n, S, S, 3], decoded without torch (see TORCH_THREAD)
    future: asyncio.Future


class DynamicBatcher:
    def __init__(self, predictor: Predictor, *, max_batch: int, max_wait_ms: float,
                 tenant_id: str = "",
                 on_batch: Callable[[int, str], None] | None = None) -> None:
        self.predictor, self.max_batch, self.max_wait = predictor, max_batch, max_wait_ms / 1000
        self.on_batch = on_batch  # gets each forward's image count and engine (the metrics)
        self.tenant_id = tenant_id  # whose model this is: checked before every prediction
        self._queue: asyncio.Queue[_Item | None] | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.incoming = 0  # requests for this model not yet submitted
        self.batches = 0  # forwards run, for the statistics
        self.images = 0

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Wrap receiving and decoding a request, so the batcher knows peers are coming."""
        self.incoming += 1
        try:
            yield
        finally:
            self.incoming -= 1

    async def probabilities(self, batch: np.ndarray) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            # First use, another event loop, or a loop that stopped after close(): start one.
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._run(self._queue))
        assert self._queue is not None
        future = loop.create_future()
        self._queue.put_nowait(_Item(batch, future))
        return await future

    async def _run(self, queue: asyncio.Queue[_Item | None]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await queue.get()
            if first is None:  # closed: requests queued before this were served
                return
            items = [first]
            size = len(first.batch)
            deadline = loop.time() + self.max_wait
            limit = min(self.max_batch, self.predictor.batch_size or self.max_batch)
            while size < limit:
                if not queue.empty():
                    item = queue.get_nowait()
                elif self.incoming > 0 and loop.time() < deadline:
                    try:
                        item = await asyncio.wait_for(queue.get(), deadline - loop.time())
                    except TimeoutError:
                        break
                else:
                    break
                if item is None:  # closed while gathering: serve these, then stop
                    await self._forward(items)
                    return
                items.append(item)
                size += len(item.batch)
            await self._forward(items)

    async def _forward(self, items: list[_Item]) -> None:
        batch = np.concatenate([item.batch for item in items])
        engine = self.predictor.engine  # what runs this forward (it may change for the next)
        try:
            probs = await asyncio.get_running_loop().run_in_executor(
                TORCH_THREAD, self.predictor.probabilities_from_arrays, batch)
        except BaseException as exc:  # every waiting request gets the error, none hangs
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc if isinstance(exc, Exception)
                                              else RuntimeError("prediction interrupted"))
            if not isinstance(exc, Exception):
                raise
            return
        self.batches += 1
        self.images += len(batch)
        if self.on_batch is not None:
            self.on_batch(len(batch), engine)
        start = 0
        for item in items:
            if not item.future.done():
                item.future.set_result(probs[start:start + len(item.batch)])
            start += len(item.batch)

    def close(self) -> None:
        """Stop after serving what is queued; safe from any thread (eviction runs on one)."""
        loop, queue = self._loop, self._queue
        if loop is not None and queue is not None and not loop.is_closed():
            loop.call_soon_threadsafe(queue.put_nowait, None)
