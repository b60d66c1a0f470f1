"""Live workers: each worker process keeps a short-lived Redis key alive while it consumes.

Counted from Redis rather than with Celery's ping, because a worker busy training cannot
answer a ping but keeps its key fresh from a thread.
"""

from __future__ import annotations

import redis

WORKER_KEY_PREFIX = "ftune:worker:"


def worker_key(name: str) -> str:
    return WORKER_KEY_PREFIX + name


def worker_key_ttl_s(interval_s: float) -> int:
    """A key outlives a few missed beats, so one slow beat never hides a live worker."""
    return max(2, int(interval_s * 3))


def live_worker_count(client: redis.Redis) -> int:
    return sum(1 for _ in client.scan_iter(match=WORKER_KEY_PREFIX + "*", count=100))
