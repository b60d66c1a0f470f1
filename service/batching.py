"""Dynamic batching: concurrent predict requests for one model share forward passes, whichever
engine runs them (torch or ONNX Runtime: service/serving.py), in the process's lanes.

A request's images wait for peers only while other requests for the same model are on their
way (being received or decoded), and then at most ``max_wait_ms``; a lone request goes
straight through. Forwards run on the process's forward threads, never on the event loop:
up to one per lane at once, each on its share of the cores, and a request that finds every
lane idle and nobody waiting on the wide thread with every core (models/serving/lanes.py).
Requests arriving while the lanes are busy form the next batches. A forward takes at most the
images its engine runs fastest at in its lane (``Predictor.batch_size``, measured on this
host) and answers them as soon as it ends; a request with more images is split over the
lanes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ftune.models.serving.lanes import lane_layout
from ftune.service.forward_threads import ForwardLanes, forward_lanes

if TYPE_CHECKING:  # torch loads with the first model, never with the API itself
    import torch

    from ftune.models.predictor import Predictor


# What a request's images arrive as (files, say) -> uint8 [n, S, S, 3] arrays; run on the
# forward's thread just before it: one hop fewer per request, and the arrays are still in that
# core's caches when the forward reads them. Its error fails that request only.
Inputs = Sequence[Any] | np.ndarray
Decode = Callable[[Inputs], np.ndarray]
# A request's decoded arrays and their probabilities.
Answer = tuple[np.ndarray, "torch.Tensor"]


@dataclass
class _Item:
    inputs: Inputs  # images, as ``decode`` takes them
    decode: Decode | None  # None: ``inputs`` is already a uint8 [n, S, S, 3] array
    future: asyncio.Future[Answer]

    def arrays(self) -> np.ndarray:
        return np.asarray(self.inputs) if self.decode is None else self.decode(self.inputs)


class DynamicBatcher:
    def __init__(self, predictor: Predictor, *, max_batch: int, max_wait_ms: float,
                 tenant_id: str = "", lanes: ForwardLanes | None = None,
                 on_batch: Callable[[int, str], None] | None = None) -> None:
        self.predictor, self.max_batch, self.max_wait = predictor, max_batch, max_wait_ms / 1000
        self.lanes = lanes or forward_lanes(lane_layout(str(predictor.device)))
        self.on_batch = on_batch  # gets each forward's image count and engine (the metrics)
        self.tenant_id = tenant_id  # whose model this is: checked before every prediction
        self._queue: asyncio.Queue[_Item | None] | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._freed: asyncio.Event | None = None  # a forward of this model ended
        self._in_flight = 0  # lanes this model's forwards hold (a wide one holds them all)
        self._forwards: set[asyncio.Task] = set()
        self._carried: _Item | None = None  # gathered, but over a forward's limit: next
        self.incoming = 0  # requests for this model not yet submitted
        self.batches = 0  # forwards run, for the statistics
        self.wide_batches = 0  # of which on every core (a lone request)
        self.images = 0

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Wrap receiving and decoding a request, so the batcher knows peers are coming."""
        self.incoming += 1
        try:
            yield
        finally:
            self.incoming -= 1

    def _limit(self) -> int:
        """Most images in one forward: what the engine runs fastest at, in its lane."""
        return min(self.max_batch, self.predictor.batch_size or self.max_batch)

    async def probabilities(self, batch: np.ndarray) -> torch.Tensor:
        """Probabilities for uint8 ``[N, S, S, 3]`` arrays."""
        return (await self.predict(batch))[1]

    async def predict(self, inputs: Inputs, decode: Decode | None = None) -> Answer:
        """The images' arrays (``decode(inputs)``, run on the forward's thread; None:
        ``inputs`` are the arrays) and their probabilities."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            # First use, another event loop, or a loop that stopped after close(): start one.
            self._loop, self._queue, self._freed = loop, asyncio.Queue(), asyncio.Event()
            self._in_flight, self._forwards, self._carried = 0, set(), None
            self._task = loop.create_task(self._run(self._queue))
        assert self._queue is not None
        # Split over the lanes: a forward's worth at most, and no lane left idle.
        step = max(1, min(self._limit(), math.ceil(len(inputs) / self.lanes.layout.lanes)))
        futures: list[asyncio.Future[Answer]] = []
        for start in range(0, len(inputs), step):
            futures.append(loop.create_future())
            self._queue.put_nowait(_Item(inputs[start:start + step], decode, futures[-1]))
        if len(futures) == 1:
            return await futures[0]
        parts = await asyncio.gather(*futures, return_exceptions=True)
        answers = [p for p in parts if not isinstance(p, BaseException)]
        if len(answers) < len(parts):  # each part waited for: no error left unretrieved
            raise next(p for p in parts if isinstance(p, BaseException))
        import torch

        return (np.concatenate([arrays for arrays, _ in answers]),
                torch.cat([probs for _, probs in answers]))

    async def _run(self, queue: asyncio.Queue[_Item | None]) -> None:
        while True:
            first, self._carried = self._carried or await queue.get(), None
            if first is None:  # closed: requests queued before this were served
                return
            await self._lane_free()
            if self._alone(queue):
                self._start([first], wide=True)
                continue
            items, closed = await self._gather(first, queue)
            self._start(items, wide=False)
            if closed:
                return

    def _depth(self) -> int:
        """Forwards this model keeps submitted: one running in each lane and one waiting
        behind it, so a lane that finishes starts the next at once, not when the event loop
        gets to it (ONNX Runtime, 2 lanes: about 8% more images/s)."""
        return 2 * self.lanes.layout.lanes

    async def _lane_free(self) -> None:
        assert self._freed is not None
        while self._in_flight >= self._depth():
            self._freed.clear()
            await self._freed.wait()

    def _alone(self, queue: asyncio.Queue[_Item | None]) -> bool:
        """Every lane idle and nobody on the way: this forward gets every core."""
        return (self.lanes.layout.lanes > 1 and self._in_flight == 0 and self.lanes.busy == 0
                and queue.empty() and self._carried is None and self.incoming == 0)

    async def _gather(self, first: _Item, queue: asyncio.Queue[_Item | None]
                      ) -> tuple[list[_Item], bool]:
        """``first`` and the requests to run with it; whether the batcher was closed."""
        loop = asyncio.get_running_loop()
        items, size = [first], len(first.inputs)
        deadline = loop.time() + self.max_wait
        while size < self._limit():
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
                return items, True
            if size + len(item.inputs) > self._limit():  # it starts the next forward
                self._carried = item
                break
            items.append(item)
            size += len(item.inputs)
        return items, False

    def _start(self, items: list[_Item], wide: bool) -> None:
        held = self._depth() if wide else 1
        self._in_flight += held
        task = asyncio.get_running_loop().create_task(self._forward(items, wide))
        self._forwards.add(task)

        def ended(_: object) -> None:
            self._in_flight -= held
            self._forwards.discard(task)
            assert self._freed is not None
            self._freed.set()

        task.add_done_callback(ended)

    async def _forward(self, items: list[_Item], wide: bool) -> None:
        engine = self.predictor.engine  # what runs this forward (it may change for the next)
        try:
            decoded, probs = await self.lanes.run(
                wide, functools.partial(self._decode_and_forward, items))
        except BaseException as exc:  # every waiting request gets the error, none hangs
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc if isinstance(exc, Exception)
                                              else RuntimeError("prediction interrupted"))
            if not isinstance(exc, Exception):
                raise
            return
        if probs is not None:
            self.batches += 1
            self.wide_batches += wide
            self.images += len(probs)
            if self.on_batch is not None:
                self.on_batch(len(probs), engine)
        start = 0
        for item, arrays in zip(items, decoded, strict=True):
            if isinstance(arrays, Exception):
                if not item.future.done():  # its request may have been cancelled meanwhile
                    item.future.set_exception(arrays)
                continue
            if probs is not None and not item.future.done():
                item.future.set_result((arrays, probs[start:start + len(arrays)]))
            start += len(arrays)

    def _decode_and_forward(self, items: list[_Item], threads: int
                            ) -> tuple[list[np.ndarray | Exception], torch.Tensor | None]:
        """On the forward's thread: each request's arrays (or why they could not be
        decoded), and the probabilities of those that could be."""
        decoded: list[np.ndarray | Exception] = []
        for item in items:
            try:
                decoded.append(item.arrays())
            except Exception as exc:
                decoded.append(exc)
        good = [arrays for arrays in decoded if not isinstance(arrays, Exception)]
        if not good:
            return decoded, None
        return decoded, self.predictor.probabilities_from_arrays(np.concatenate(good), threads)

    def close(self) -> None:
        """Stop after serving what is queued; safe from any thread (eviction runs on one)."""
        loop, queue = self._loop, self._queue
        if loop is not None and queue is not None and not loop.is_closed():
            loop.call_soon_threadsafe(queue.put_nowait, None)
