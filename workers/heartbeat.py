"""Each worker process keeps a short-lived Redis key alive, so the API can count live workers
even while a worker is busy training (a blocked worker cannot answer Celery's ping)."""

from __future__ import annotations

import contextlib
import logging
import threading

import redis

log = logging.getLogger(__name__)

KEY_PREFIX = "ftune:worker:"


def live_worker_count(client: redis.Redis) -> int:
    return sum(1 for _ in client.scan_iter(match=KEY_PREFIX + "*", count=100))


class Heartbeat:
    def __init__(self, redis_url: str, name: str, interval_s: float) -> None:
        self.client = redis.Redis.from_url(redis_url, socket_connect_timeout=3, socket_timeout=3)
        self.key, self.interval = KEY_PREFIX + name, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ftune-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        ttl = max(2, int(self.interval * 3))
        while not self._stop.is_set():
            try:
                self.client.set(self.key, "1", ex=ttl)
            except redis.RedisError as exc:
                log.warning("heartbeat to Redis failed: %s", exc)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            self.client.delete(self.key)
