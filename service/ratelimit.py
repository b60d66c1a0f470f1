"""Rate limits per key on uploads, job submissions and predictions, as moving windows. Kept in
Redis (the ``limits`` library), so they hold across API processes; ``ftune serve`` has no
Redis and keeps them in its own memory (its /healthz says so), in ``InProcessWindows``: the
``limits`` library's memory storage starts a timer thread whenever its last one has ended,
which under a steady stream of predictions is about a hundred new threads a second.

If Redis cannot be reached, requests are let through unchecked (fail open): rate limits
protect the service, they are not what makes it correct, and everything that needs Redis fails
with a 503 anyway. So while Redis is down a key may exceed its rate on routes that do not need
Redis (predictions, uploads): each request let through so is logged and counted in /metrics as
``ftune_rate_limit_unenforced_total{limit="uploads|jobs|predictions"}``, for an alert.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque

import redis
from limits import RateLimitItem, parse, storage, strategies

from ftune.service.errors import TooManyRequests
from ftune.service.settings import Settings

log = logging.getLogger(__name__)

NAMESPACE = "ftune"


class InProcessWindows:
    """Moving windows in this process's memory: each key's hits, oldest first, dropped once
    out of the window when the key is next hit."""

    def __init__(self) -> None:
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, rate: RateLimitItem, *identifiers: str) -> bool:
        key, now = rate.key_for(*identifiers), time.time()
        with self._lock:
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= now - rate.get_expiry():
                hits.popleft()
            if len(hits) >= rate.amount:
                return False
            hits.append(now)
            return True

    def reset_time(self, rate: RateLimitItem, *identifiers: str) -> float:
        """When the key's oldest hit in the window leaves it (time.time())."""
        with self._lock:
            hits = self._hits.get(rate.key_for(*identifiers))
            return hits[0] + rate.get_expiry() if hits else time.time()


class InRedis:
    """The ``limits`` library's moving windows, in Redis."""

    def __init__(self, url: str) -> None:
        self.limiter = strategies.MovingWindowRateLimiter(storage.RedisStorage(
            url, socket_connect_timeout=2, socket_timeout=2))

    def hit(self, rate: RateLimitItem, *identifiers: str) -> bool:
        return self.limiter.hit(rate, *identifiers)

    def reset_time(self, rate: RateLimitItem, *identifiers: str) -> float:
        return self.limiter.get_window_stats(rate, *identifiers).reset_time


class RateLimiter:
    def __init__(self, settings: Settings, *, in_memory: bool = False) -> None:
        self.limiter = InProcessWindows() if in_memory else InRedis(settings.broker_url)
        self.in_memory = in_memory
        # Requests let through unchecked, per limit, since the process started (/metrics).
        self.unenforced: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.rates: dict[str, RateLimitItem] = {
            "uploads": parse(settings.rate_uploads),
            "jobs": parse(settings.rate_jobs),
            "predictions": parse(settings.rate_predictions),
        }

    @property
    def where(self) -> str:
        return "in this process's memory (ftune serve)" if self.in_memory else "in Redis"

    def hit(self, category: str, identity: str) -> None:
        """Count one request; 429 with Retry-After when the key is over the rate."""
        rate = self.rates[category]
        try:
            if self.limiter.hit(rate, NAMESPACE, category, identity):
                return
            reset_at = self.limiter.reset_time(rate, NAMESPACE, category, identity)
        except (redis.RedisError, OSError) as exc:
            log.warning("rate limit %s not checked (Redis unreachable): %s", category, exc)
            with self._lock:
                self.unenforced[category] += 1
            return
        raise TooManyRequests(f"rate limit for {category}: {rate} per key; slow down",
                              retry_after_s=max(1.0, reset_at - time.time()))
