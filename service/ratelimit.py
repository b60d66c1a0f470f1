"""Rate limits per key on uploads, job submissions and predictions, with the ``limits``
library (moving windows). Kept in Redis, so they hold across API processes; ``ftune serve``
has no Redis and keeps them in its own memory (its /healthz says so).

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
from collections import Counter

import redis
from limits import RateLimitItem, parse, storage, strategies

from ftune.service.errors import TooManyRequests
from ftune.service.settings import Settings

log = logging.getLogger(__name__)

NAMESPACE = "ftune"


class RateLimiter:
    def __init__(self, settings: Settings, *, in_memory: bool = False) -> None:
        backend = (storage.MemoryStorage() if in_memory else storage.RedisStorage(
            settings.broker_url, socket_connect_timeout=2, socket_timeout=2))
        self.limiter = strategies.MovingWindowRateLimiter(backend)
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
            reset_at = self.limiter.get_window_stats(rate, NAMESPACE, category,
                                                     identity).reset_time
        except (redis.RedisError, OSError) as exc:
            log.warning("rate limit %s not checked (Redis unreachable): %s", category, exc)
            with self._lock:
                self.unenforced[category] += 1
            return
        raise TooManyRequests(f"rate limit for {category}: {rate} per key; slow down",
                              retry_after_s=max(1.0, reset_at - time.time()))
