"""Dynamic batching: concurrent predict requests for one model share a forward pass.

A request's images wait for peers only while other requests for the same model are on their
way (being received or decoded), and then at most ``max_wait_ms``; a lone request goes
straight through. Forwards run one at a time on the process's torch thread, never on the
event loop; requests arriving during a forward form the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from models.predictor import Predictor

# All model work of the process (loading and forwards) runs on this one thread. Each thread
# that runs torch's parallel CPU kernels gets an OpenMP team of its own, and two teams on the
# same cores slow each other down (measured: a forward 1.7× slower when the model was loaded
# on another thread).
TORCH_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")


@dataclass
class _Item:
    batch: np.ndarray  # uint8 [n, S, S, 3], decoded without torch (see TORCH_THREAD)
    future: asyncio.Future


class DynamicBatcher:
    def __init__(self, predictor: Predictor, *, max_batch: int, max_wait_ms: float) -> None:
        self.predictor, self.max_batch, self.max_wait = predictor, max_batch, max_wait_ms / 1000
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
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
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(batch, future))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            size = len(items[0].batch)
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                if not self._queue.empty():
                    item = self._queue.get_nowait()
                elif self.incoming > 0 and loop.time() < deadline:
                    try:
                        item = await asyncio.wait_for(self._queue.get(),
                                                      deadline - loop.time())
                    except TimeoutError:
                        break
                else:
                    break
                items.append(item)
                size += len(item.batch)
            await self._forward(items)

    async def _forward(self, items: list[_Item]) -> None:
        batch = np.concatenate([item.batch for item in items])
        try:
            probs = await asyncio.get_running_loop().run_in_executor(
                TORCH_THREAD, self.predictor.probabilities_from_arrays, batch)
        except Exception as exc:  # every waiting request gets the error, none hangs
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        self.batches += 1
        self.images += len(batch)
        start = 0
        for item in items:
            if not item.future.done():
                item.future.set_result(probs[start:start + len(item.batch)])
            start += len(item.batch)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
