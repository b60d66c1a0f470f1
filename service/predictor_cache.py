"""Loaded models in the API process, for predictions: each with its batcher, bounded by
memory."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from ftune.models.serving.lanes import lane_layout
from ftune.service.batching import DynamicBatcher
from ftune.service.db.tables import TunedModel
from ftune.service.forward_threads import LOAD_THREAD, forward_lanes
from ftune.service.freed_memory import return_freed_memory
from ftune.service.serving import ServingEngines
from ftune.service.storage import Storage
from ftune.service.tuned_models import bundle_folder


class PredictorCache:
    """Loaded models (each with its batcher) kept in the API process, bounded by memory:
    least recently used evicted first. A per-model lock makes concurrent first requests load
    the model once. Each carries its tenant, and a lookup by id is trusted only for a second:
    after that the model is looked up again (it may have been deleted)."""

    def __init__(self, storage: Storage, max_bytes: int, *, max_batch: int = 32,
                 max_wait_ms: float = 5.0, lanes: int = 0,
                 engines: ServingEngines | None = None) -> None:
        self.storage, self.max_bytes, self.engines = storage, max_bytes, engines
        self.lanes = lanes  # FTUNE_SERVE_LANES (models/serving/lanes.py)
        self.max_batch, self.max_wait_ms = max_batch, max_wait_ms
        self._loaded: OrderedDict[str, DynamicBatcher] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._checked: dict[str, float] = {}  # model id -> time.monotonic() of its last lookup
        self.loads = 0  # misses: a request had to load its model
        self.hits = 0  # requests that found their model loaded
        # Given to each model's batcher: a forward's image count and engine.
        self.on_batch: Callable[[int, str], None] | None = None
        self._evicted_batches = self._evicted_images = 0

    def get(self, model: TunedModel) -> DynamicBatcher:
        """The model's batcher, loading it if needed; call after looking the model up."""
        model_id, tenant_id = model.id, model.tenant_id
        with self._lock:
            self._checked[model_id] = time.monotonic()
            if model_id in self._loaded:
                self.hits += 1
                self._loaded.move_to_end(model_id)
                return self._loaded[model_id]
            loading = self._loading.setdefault(model_id, threading.Lock())
        with loading:
            with self._lock:
                if model_id in self._loaded:  # loaded by a concurrent first request
                    self.hits += 1
                    return self._loaded[model_id]
            from ftune.models.predictor import Predictor  # torch loads on the first predict only

            folder = bundle_folder(self.storage, model)  # fetched from the store once
            predictor = LOAD_THREAD.submit(Predictor.load, folder).result()
            layout = lane_layout(str(predictor.device), self.lanes)
            if self.engines is not None:  # torch, or ONNX Runtime once the model passes
                self.engines.attach(model, predictor, layout)
            batcher = DynamicBatcher(predictor, max_batch=self.max_batch,
                                     max_wait_ms=self.max_wait_ms, tenant_id=tenant_id,
                                     lanes=forward_lanes(layout), on_batch=self.on_batch)
            with self._lock:
                self.loads += 1
                self._loaded[model_id] = batcher
                self._sizes[model_id] = predictor.memory_bytes()
                # Keep at least the newest model, even when it alone is over the budget.
                evicting = False
                while sum(self._sizes.values()) > self.max_bytes and len(self._loaded) > 1:
                    evicting = True
                    evicted, old = self._loaded.popitem(last=False)
                    self._sizes.pop(evicted, None)
                    self._checked.pop(evicted, None)
                    self._evicted_batches += old.batches
                    self._evicted_images += old.images
                    old.close()
                self._loading.pop(model_id, None)
            if evicting:  # what the evicted models held goes back to the system (once freed)
                LOAD_THREAD.submit(return_freed_memory)
            return batcher

    def peek(self, model_id: str, max_age_s: float = 1.0) -> DynamicBatcher | None:
        """The loaded model if it was looked up less than ``max_age_s`` ago; never loads."""
        with self._lock:
            fresh = time.monotonic() - self._checked.get(model_id, -math.inf) < max_age_s
            if not fresh or model_id not in self._loaded:
                return None
            self.hits += 1
            self._loaded.move_to_end(model_id)
            return self._loaded[model_id]

    @property
    def batches(self) -> int:
        return self._evicted_batches + sum(b.batches for b in list(self._loaded.values()))

    @property
    def images(self) -> int:
        return self._evicted_images + sum(b.images for b in list(self._loaded.values()))

    def resize(self, model_id: str) -> None:
        """Count a loaded model's memory again (its engine changed)."""
        with self._lock:
            if model_id in self._loaded:
                self._sizes[model_id] = self._loaded[model_id].predictor.memory_bytes()

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def __len__(self) -> int:
        return len(self._loaded)
