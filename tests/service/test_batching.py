"""Dynamic batching and the memory-bounded model cache, with a real tuned model."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from ftune.models.training.fit import fit
from ftune.service.batching import DynamicBatcher
from ftune.service.db.tables import TunedModel
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


def test_concurrent_requests_share_one_forward_with_the_same_answers(model_home):
    storage, models = model_home
    batcher = PredictorCache(storage, 1 << 30).get(models[0])
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (1, 3, 2, 1)]
    expected = [batcher.predictor.probabilities_from_arrays(b) for b in batches]

    async def together() -> list[torch.Tensor]:
        return await asyncio.gather(*(batcher.probabilities(b) for b in batches))

    results = asyncio.run(together())
    assert batcher.batches == 1 and batcher.images == 7  # one forward for four requests
    for got, want in zip(results, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-5)
    batcher.close()


def test_a_forward_takes_at_most_the_engine_s_batch_size(model_home):
    storage, models = model_home
    predictor = PredictorCache(storage, 1 << 30).get(models[0]).predictor
    predictor.serve_with(None, "torch", batch_size=2)  # as if measured fastest at 2
    batcher = DynamicBatcher(predictor, max_batch=32, max_wait_ms=5)
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (1, 1, 1, 1, 3)]
    expected = [predictor.probabilities_from_arrays(b) for b in batches]

    async def together() -> list[torch.Tensor]:
        return await asyncio.gather(*(batcher.probabilities(b) for b in batches))

    results = asyncio.run(together())
    # 1+1, 1+1, then the 3-image request alone (in chunks of 2 within its forward).
    assert batcher.batches == 3 and batcher.images == 7
    for got, want in zip(results, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-5)
    batcher.close()


def test_a_lone_request_does_not_wait_for_the_batch_window(model_home):
    storage, models = model_home
    predictor = PredictorCache(storage, 1 << 30).get(models[0]).predictor
    batcher = DynamicBatcher(predictor, max_batch=32, max_wait_ms=2000)
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
