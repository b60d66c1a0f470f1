"""Dynamic batching and the memory-bounded model cache, with a real tuned model."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from ftune.models.serving.lanes import LaneLayout
from ftune.models.training.fit import fit
from ftune.service.batching import DynamicBatcher
from ftune.service.db.tables import TunedModel
from ftune.service.forward_threads import forward_lanes
from ftune.service.predictor_cache import PredictorCache
from ftune.service.storage import Storage
from ftune.testing.models import store_bundle


@pytest.fixture(scope="module")
def model_home(tiny_folder, tmp_path_factory):
    storage = Storage(tmp_path_factory.mktemp("home"))
    storage.prepare()
    models = []
    for model_id in ("a" * 32, "b" * 32):
        stored = store_bundle(storage, fit(tiny_folder, {"image_size": 32, "epochs": 1}),
                              model_id)
        models.append(TunedModel(id=model_id, tenant_id="t" * 32, blob_sha256=stored.sha256))
    return storage, models


TWO_LANES = LaneLayout(lanes=2, threads=1, wide_threads=2)


def _batcher(model_home, *, batch_size: int | None = None, layout: LaneLayout = TWO_LANES,
             max_wait_ms: float = 5) -> DynamicBatcher:
    storage, models = model_home
    predictor = PredictorCache(storage, 1 << 30).get(models[0]).predictor
    predictor.serve_with(None, "torch", batch_size)  # as if measured fastest at batch_size
    return DynamicBatcher(predictor, max_batch=32, max_wait_ms=max_wait_ms,
                          lanes=forward_lanes(layout))


def _images(seed: int, *sizes: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in sizes]


def _together(batcher: DynamicBatcher, batches: list[np.ndarray]) -> list[torch.Tensor]:
    async def run() -> list[torch.Tensor]:
        return await asyncio.gather(*(batcher.probabilities(b) for b in batches))

    return asyncio.run(run())


def test_concurrent_requests_share_one_forward_with_the_same_answers(model_home):
    batcher = _batcher(model_home)
    batches = _images(0, 1, 3, 2, 1)
    expected = [batcher.predictor.probabilities_from_arrays(b) for b in batches]
    results = _together(batcher, batches)
    assert batcher.batches == 1 and batcher.images == 7  # one forward for four requests
    for got, want in zip(results, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-5)
    batcher.close()


def test_a_forward_takes_at_most_the_engine_s_batch_size(model_home):
    batcher = _batcher(model_home, batch_size=2)
    sizes: list[int] = []
    batcher.on_batch = lambda images, engine: sizes.append(images)
    batches = _images(1, 1, 1, 1, 1, 3)
    expected = [batcher.predictor.probabilities_from_arrays(b) for b in batches]
    results = _together(batcher, batches)
    # 1+1, 1+1, then the 3-image request split over the two lanes (2 and 1).
    assert sorted(sizes) == [1, 2, 2, 2] and batcher.images == 7
    for got, want in zip(results, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-5)
    batcher.close()


def test_forwards_run_side_by_side_in_the_lanes_each_on_its_share_of_the_cores(model_home):
    """Decoding runs on the forward's thread: slow decodes show which threads forward, how
    many at once, and with how many torch threads."""
    batcher = _batcher(model_home, batch_size=1)
    seen: list[tuple[str, int]] = []
    running, most = 0, 0
    lock = threading.Lock()

    def slow_decode(images: list[np.ndarray]) -> np.ndarray:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            seen.append((threading.current_thread().name, torch.get_num_threads()))
        time.sleep(0.2)  # sleeps without the GIL: a thread of its own each
        with lock:
            running -= 1
        return np.concatenate(images)

    async def requests() -> list[tuple[np.ndarray, torch.Tensor]]:
        return await asyncio.gather(*(batcher.predict([image], slow_decode)
                                      for image in _images(2, 1, 1, 1, 1, 1, 1)))

    answers = asyncio.run(requests())
    assert most == 2  # both lanes at once, never more
    assert {name for name, _ in seen} == {"lane_0", "lane_1"}
    assert {threads for _, threads in seen} == {1}
    assert all(probs.shape == (1, 3) for _, probs in answers)
    batcher.close()


def test_a_lone_request_gets_every_core(model_home):
    batcher = _batcher(model_home)
    seen: list[tuple[str, int]] = []

    def record(images: list[np.ndarray]) -> np.ndarray:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return np.concatenate(images)

    for image in _images(3, 1, 1):  # one after the other: each alone
        asyncio.run(batcher.predict([image], record))
    assert [name for name, _ in seen] == ["torch_0", "torch_0"]  # TORCH_THREAD
    assert seen[-1][1] == TWO_LANES.wide_threads  # the thread count its forward ran with
    assert batcher.wide_batches == batcher.batches == 2
    batcher.close()


def test_one_lane_runs_every_forward_on_every_core(model_home):
    one = LaneLayout(lanes=1, threads=torch.get_num_threads(),
                     wide_threads=torch.get_num_threads())
    batcher = _batcher(model_home, layout=one, batch_size=1)
    results = _together(batcher, _images(4, 1, 2, 1))
    assert [r.shape[0] for r in results] == [1, 2, 1]
    assert batcher.wide_batches == 0 and batcher.images == 4
    batcher.close()


def test_an_image_that_cannot_be_decoded_fails_its_own_request_only(model_home):
    batcher = _batcher(model_home)
    good, bad = _images(5, 2, 1)

    def decode(images: list[np.ndarray]) -> np.ndarray:
        if any(image is bad for image in images):
            raise ValueError("bad.png: damaged")
        return np.stack(images)

    async def both() -> list:
        return await asyncio.gather(batcher.predict(list(good), decode),
                                    batcher.predict([bad], decode), return_exceptions=True)

    answer, failure = asyncio.run(both())
    assert isinstance(failure, ValueError) and "bad.png" in str(failure)
    arrays, probs = answer
    assert np.array_equal(arrays, good)
    assert torch.allclose(probs, batcher.predictor.probabilities_from_arrays(good), atol=1e-5)
    batcher.close()


def test_a_request_cancelled_while_its_images_decode_leaves_its_batch_answered(model_home):
    batcher = _batcher(model_home)
    slow, fine = _images(6, 1, 1)

    def decode(images: list[np.ndarray]) -> np.ndarray:
        if any(image is slow for image in images):
            time.sleep(0.3)
            raise ValueError("slow.png: damaged")
        return np.concatenate(images)

    async def scenario() -> torch.Tensor:
        gone = asyncio.ensure_future(batcher.predict([slow], decode))
        kept = asyncio.ensure_future(batcher.predict([fine], decode))
        await asyncio.sleep(0.1)  # both in one forward, the first still decoding
        gone.cancel()
        _, probs = await asyncio.wait_for(kept, 10)
        return probs

    assert asyncio.run(scenario()).shape == (1, 3)
    batcher.close()


def test_a_lone_request_does_not_wait_for_the_batch_window(model_home):
    batcher = _batcher(model_home, max_wait_ms=2000)
    image = np.zeros((1, 32, 32, 3), dtype=np.uint8)

    async def alone() -> float:
        started = time.perf_counter()
        await batcher.probabilities(image)
        return time.perf_counter() - started

    assert asyncio.run(alone()) < 1.0  # far below the 2 s window
    batcher.close()


def test_cache_is_bounded_by_memory_and_loads_once(model_home):
    storage, models = model_home
    probe = PredictorCache(storage, 1 << 30)
    one_model = probe.get(models[0]).predictor.memory_bytes()
    cache = PredictorCache(storage, int(one_model * 1.5))  # room for one model only
    first = cache.get(models[0])
    assert cache.get(models[0]) is first and cache.loads == 1
    cache.get(models[1])
    assert len(cache) == 1 and cache.peek(models[0].id) is None and cache.bytes == one_model
    cache.get(models[0])
    assert cache.loads == 3


def test_concurrent_first_requests_load_the_model_once(model_home):
    from concurrent.futures import ThreadPoolExecutor

    storage, models = model_home
    cache = PredictorCache(storage, 1 << 30)
    with ThreadPoolExecutor(6) as pool:
        batchers = list(pool.map(lambda _: cache.get(models[1]), range(6)))
    assert cache.loads == 1 and all(b is batchers[0] for b in batchers)


def test_a_closed_batcher_serves_what_is_queued_and_restarts_on_demand(model_home):
    storage, models = model_home
    batcher = PredictorCache(storage, 1 << 30).get(models[0])
    image = np.zeros((1, 32, 32, 3), dtype=np.uint8)

    async def scenario() -> None:
        first = await batcher.probabilities(image)
        pending = asyncio.ensure_future(batcher.probabilities(image))
        await asyncio.sleep(0)
        batcher.close()  # as an eviction would, from any thread
        assert torch.equal(await pending, first)
        assert torch.equal(await batcher.probabilities(image), first)  # started again

    asyncio.run(scenario())
    # A second event loop (another TestClient, say) gets a batcher loop of its own.
    assert asyncio.run(batcher.probabilities(image)).shape == (1, 3)


def _rss_mb() -> float:
    status = open("/proc/self/status").read()  # noqa: SIM115 (read whole, closed at once)
    return int(next(line for line in status.splitlines()
                    if line.startswith("VmRSS:")).split()[1]) / 1024


def test_models_evicted_over_and_over_give_their_memory_back(model_home):
    """Loading and evicting models again and again (a full cache serving many models) must
    not grow the process: freed memory the allocator keeps is given back
    (service/freed_memory.py)."""
    storage, models = model_home
    probe = PredictorCache(storage, 1 << 30)
    cache = PredictorCache(storage, int(probe.get(models[0]).predictor.memory_bytes() * 1.5))
    for i in range(12):  # warm: the allocator's arenas and torch's own caches fill
        cache.get(models[i % 2])
    time.sleep(0.5)
    before = _rss_mb()
    for i in range(40):
        cache.get(models[i % 2])  # each load evicts the other model
    assert cache.loads == 52 and len(cache) == 1
    time.sleep(0.5)
    assert _rss_mb() - before < 40
