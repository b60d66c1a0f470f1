"""``/metrics`` in Prometheus' text format, for operators.

Two kinds of numbers:

* what the database and Redis know, read at each scrape: jobs per state and tenant, the queue,
  finished jobs, job durations and epoch times (from the stored rows, so every worker on every
  machine is counted without scraping it), and each live worker's heartbeat with its GPU
  memory (workers put it in their Redis heartbeat);
* what only this API process sees, kept in its own registry: upload and predict latency, the
  batch sizes the batcher forms, the model cache's hits, misses and bytes, and requests let
  through unchecked while Redis was down (``ftune_rate_limit_unenforced_total``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from ftune.service.db.session import Database
from ftune.service.db.tables import EpochMetrics, Job, Tenant
from ftune.service.job_status import TERMINAL, JobStatus
from ftune.service.lifecycle.liveness import WORKER_KEY_PREFIX
from ftune.service.predictor_cache import PredictorCache
from ftune.service.ratelimit import RateLimiter

JOB_SECONDS = (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
EPOCH_SECONDS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900)
REQUEST_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_IMAGES = (1, 2, 4, 8, 16, 32, 64, 128)


def _histogram(name: str, doc: str, values: list[float], bounds: tuple[float, ...]) -> Metric:
    """A histogram family from all observations (cumulative buckets, +Inf, sum)."""
    buckets = [(str(float(b)), sum(1 for v in values if v <= b)) for b in bounds]
    buckets.append(("+Inf", len(values)))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=float(sum(values)))


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start and end else None


class StoredStateCollector(Collector):
    """Jobs, durations, epochs and workers, read from the database and Redis per scrape."""

    def __init__(self, db: Database, redis_client: redis.Redis | None) -> None:
        self.db, self.redis = db, redis_client

    def collect(self) -> Iterator[Metric]:
        yield from self._jobs()
        yield from self._workers()

    def _jobs(self) -> Iterator[Metric]:
        with self.db.session() as session:
            by_state = session.execute(
                select(Job.status, Tenant.name, func.count()).join(
                    Tenant, Tenant.id == Job.tenant_id, isouter=True)
                .group_by(Job.status, Tenant.name)).all()
            spans = session.execute(select(Job.started_at, Job.finished_at).where(
                Job.status.in_([str(s) for s in TERMINAL]))).all()
            epochs = session.execute(select(EpochMetrics.row)).scalars().all()
        jobs = GaugeMetricFamily("ftune_jobs", "Jobs in each state, per tenant",
                                 labels=["state", "tenant"])
        finished = CounterMetricFamily("ftune_jobs_finished", "Jobs that ended, by how (as "
                                       "stored: deleting jobs lowers it)", labels=["state"])
        totals: dict[str, int] = {}
        for state, tenant, count in by_state:
            jobs.add_metric([str(state), tenant or ""], count)
            totals[str(state)] = totals.get(str(state), 0) + count
        for state in TERMINAL:
            finished.add_metric([str(state)], totals.get(str(state), 0))
        yield jobs
        yield finished
        yield GaugeMetricFamily("ftune_queue_depth", "Jobs waiting to start",
                                value=totals.get(str(JobStatus.QUEUED), 0))
        durations = [s for s in (_seconds(a, b) for a, b in spans) if s is not None]
        yield _histogram("ftune_job_duration_seconds", "Run time of finished jobs, from start "
                         "to end", durations, JOB_SECONDS)
        epoch_times = [float(r["seconds"]) for r in epochs
                       if isinstance(r, dict) and isinstance(r.get("seconds"), (int, float))]
        yield _histogram("ftune_epoch_seconds", "Wall time of each training epoch",
                         epoch_times, EPOCH_SECONDS)

    def _workers(self) -> Iterator[Metric]:
        alive = GaugeMetricFamily("ftune_workers_alive", "Workers whose heartbeat is fresh")
        age = GaugeMetricFamily("ftune_worker_heartbeat_age_seconds", "Seconds since each "
                                "live worker's last heartbeat", labels=["worker"])
        gpu = GaugeMetricFamily("ftune_worker_gpu_memory_bytes", "GPU memory each worker's "
                                "training holds (workers with a GPU)", labels=["worker", "kind"])
        count = 0
        if self.redis is not None:
            try:
                for key in self.redis.scan_iter(match=WORKER_KEY_PREFIX + "*", count=100):
                    name = key.decode()[len(WORKER_KEY_PREFIX):]
                    beat = _heartbeat(self.redis.get(key))
                    count += 1
                    if "at" in beat:
                        age.add_metric([name], max(0.0, time.time() - float(beat["at"])))
                    for kind in ("allocated", "reserved"):
                        if isinstance(beat.get(f"gpu_{kind}_bytes"), int):
                            gpu.add_metric([name, kind], beat[f"gpu_{kind}_bytes"])
            except redis.RedisError:
                pass  # Redis down: /healthz says so; the database's numbers still count
        alive.add_metric([], count)
        yield alive
        yield age
        yield gpu


def _heartbeat(raw: bytes | str | None) -> dict:
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class PredictorCacheCollector(Collector):
    def __init__(self, cache: PredictorCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("ftune_model_cache_requests", "Predict requests by "
                                       "whether the model was already loaded",
                                       labels=["result"])
        requests.add_metric(["hit"], self.cache.hits)
        requests.add_metric(["miss"], self.cache.loads)
        yield requests
        yield GaugeMetricFamily("ftune_model_cache_bytes", "Memory of the loaded models",
                                value=self.cache.bytes)
        yield GaugeMetricFamily("ftune_model_cache_models", "Models loaded",
                                value=len(self.cache))


class RateLimitCollector(Collector):
    """Requests whose rate limit went unchecked, Redis being unreachable (see ratelimit)."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    def collect(self) -> Iterator[Metric]:
        unenforced = CounterMetricFamily(
            "ftune_rate_limit_unenforced", "Requests let through without their rate limit "
            "checked, because Redis could not be reached", labels=["limit"])
        for limit in self.limiter.rates:
            unenforced.add_metric([limit], self.limiter.unenforced[limit])
        yield unenforced


class ServiceMetrics:
    """The API process's registry: its own instruments and the collectors above."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.request_seconds = Histogram(
            "ftune_request_seconds", "Latency of uploads and predictions, from the first "
            "byte received to the last sent", ["route"], buckets=REQUEST_SECONDS,
            registry=self.registry)
        self.batch_images = Histogram(
            "ftune_predict_batch_images", "Images in each forward pass the batcher formed",
            buckets=BATCH_IMAGES, registry=self.registry)
        self.predicted_images = Counter(
            "ftune_predicted_images", "Images predicted, by the engine that ran the forward "
            "(torch, onnxruntime, onnxruntime-int8)", ["engine"], registry=self.registry)

    def record_batch(self, images: int, engine: str) -> None:
        self.batch_images.observe(images)
        self.predicted_images.labels(engine).inc(images)

    def watch(self, db: Database, redis_client: redis.Redis | None,
              predictors: PredictorCache) -> None:
        self.registry.register(StoredStateCollector(db, redis_client))
        self.registry.register(PredictorCacheCollector(predictors))

    def watch_rate_limits(self, limiter: RateLimiter) -> None:
        self.registry.register(RateLimitCollector(limiter))

    def render(self) -> bytes:
        return generate_latest(self.registry)
