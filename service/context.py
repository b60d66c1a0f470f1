"""What every request handler needs, built once per API process."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import redis
from celery import Celery
from sqlalchemy.exc import SQLAlchemyError

from ftune.service.auth.cache import KeyCache
from ftune.service.blobs import deletions
from ftune.service.blobs.backfill import store_legacy_files
from ftune.service.blobs.base import StoreHealth
from ftune.service.db import migrate
from ftune.service.db.session import Database
from ftune.service.exports import ExportSlots
from ftune.service.lifecycle.dispatcher import dispatch
from ftune.service.metrics import ServiceMetrics
from ftune.service.predictor_cache import PredictorCache
from ftune.service.queue import make_celery
from ftune.service.ratelimit import RateLimiter
from ftune.service.serving import ServingEngines
from ftune.service.settings import Settings
from ftune.service.storage import Storage
from ftune.service.streams import StreamHub
from ftune.service.upload_slots import TenantLeases, UploadGate

log = logging.getLogger(__name__)


@dataclass
class AppContext:
    settings: Settings
    db: Database
    storage: Storage
    predictors: PredictorCache
    exports: ExportSlots  # exports and serving preparations built at once, in children
    serve_only: bool = False  # `ftune serve`: predictions only, no Redis

    @classmethod
    def build(cls, settings: Settings, *, serve_only: bool = False) -> AppContext:
        # The store is built here: a bad FTUNE_STORAGE or AWS_* value fails start-up.
        storage = Storage.for_settings(settings)
        storage.prepare()
        storage.sweep_stale()
        # The API upgrades the schema (under a lock); `ftune serve` only checks it is current.
        db = Database(settings.resolved_database_url, pool_timeout_s=settings.db_pool_timeout_s,
                      prepare=migrate.require_current if serve_only else migrate.upgrade)
        try:
            db.prepare()
        except SQLAlchemyError as exc:
            # Start anyway: /healthz reports the database down (503) until it answers.
            log.warning("database unavailable at start-up: %s", exc)
        if not serve_only:
            try:
                store_legacy_files(db, storage)
            except Exception as exc:  # the database or the store down: the next start does it
                log.warning("files from before the blob store not stored yet: %s", exc)
        slots = ExportSlots(settings.exports_at_once)
        # Serving preparations have slots of their own: one never makes a download wait.
        engines = ServingEngines(db, storage, settings, ExportSlots(
            settings.exports_at_once, busy="other models are being prepared for ONNX Runtime"))
        predictors = PredictorCache(
            storage, int(settings.predictor_cache_mb * 2**20),
            max_batch=settings.predict_max_batch, max_wait_ms=settings.predict_max_wait_ms,
            lanes=settings.serve_lanes, engines=engines)
        engines.on_change = predictors.resize
        return cls(settings, db, storage, predictors, slots, serve_only)

    @cached_property
    def storage_health(self) -> StoreHealth:
        return StoreHealth(self.storage.blobs)

    @cached_property
    def celery(self) -> Celery:
        return make_celery(self.settings)

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.broker_url, socket_connect_timeout=2,
                                    socket_timeout=2)

    @cached_property
    def metrics(self) -> ServiceMetrics:
        metrics = ServiceMetrics()
        metrics.watch(self.db, None if self.serve_only else self.redis, self.predictors)
        metrics.watch_rate_limits(self.limiter)
        self.predictors.on_batch = metrics.record_batch
        return metrics

    @cached_property
    def streams(self) -> StreamHub:
        return StreamHub(self.db, max_streams=self.settings.max_streams,
                         max_per_key=self.settings.max_streams_per_key,
                         max_per_tenant=self.settings.max_streams_per_tenant)

    @cached_property
    def uploads(self) -> UploadGate:
        """Uploads at once: per tenant (in Redis) and in this process."""
        return UploadGate(TenantLeases(self.redis), self.settings.max_unpacks)

    @cached_property
    def keys(self) -> KeyCache:
        return KeyCache(self.db, ttl_s=self.settings.key_cache_s)

    @cached_property
    def limiter(self) -> RateLimiter:
        return RateLimiter(self.settings, in_memory=self.serve_only)

    def remove_objects(self) -> int:
        """The upkeep: delete every pending scheduled store prefix (see ``blobs.deletions``);
        a database or store outage is the caller's to log and retry."""
        return deletions.remove(self.db, self.storage.blobs)

    def remove_deleted(self, prefixes: Iterable[str]) -> int:
        """Delete the prefixes a committed delete scheduled; never fails that delete (see
        ``blobs.deletions.remove_committed``)."""
        return deletions.remove_committed(self.db, self.storage.blobs, prefixes)

    def dispatch(self) -> list[str]:
        """Admit waiting jobs to free workers now (see lifecycle.dispatcher)."""
        return dispatch(self.db, self.celery, self.redis, self.settings)
