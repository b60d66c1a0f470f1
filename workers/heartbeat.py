"""The worker process's heartbeat: a thread that keeps this worker's Redis key alive, so the
API counts it as live even while a job trains (see ``service.lifecycle.liveness``)."""

from __future__ import annotations

import contextlib
import logging
import threading

import redis

from ftune.service.lifecycle.liveness import worker_key, worker_key_ttl_s

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, redis_url: str, name: str, interval_s: float) -> None:
        self.client = redis.Redis.from_url(redis_url, socket_connect_timeout=3, socket_timeout=3)
        self.key, self.interval = worker_key(name), interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ftune-heartbeat", daemon=True)

    def start(self) -> None:
        self._beat()  # live from now on, before anything counts the workers
        self._thread.start()

    def _beat(self) -> None:
        try:
            self.client.set(self.key, "1", ex=worker_key_ttl_s(self.interval))
        except redis.RedisError as exc:
            log.warning("heartbeat to Redis failed: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            self.client.delete(self.key)
