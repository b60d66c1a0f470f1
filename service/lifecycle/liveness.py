"""Live workers: each worker process keeps a short-lived Redis key alive while it consumes.

Counted from Redis rather than with Celery's ping, because a worker busy training cannot
answer a ping but keeps its key fresh from a thread. The key's value is the worker's last
beat (JSON): when it was sent and how many devices the worker has (``devices``,
``device_kind``), which the dispatcher places jobs by.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis

WORKER_KEY_PREFIX = "ftune:worker:"


@dataclass(frozen=True, order=True)
class LiveWorker:
    node: str  # the Celery node name: a running job's ``Job.worker`` is "NODE:pid"
    devices: int  # how many devices a job may train on there


def worker_key(name: str) -> str:
    return WORKER_KEY_PREFIX + name


def worker_key_ttl_s(interval_s: float) -> int:
    """A key outlives a few missed beats, so one slow beat never hides a live worker."""
    return max(2, int(interval_s * 3))


def live_worker_count(client: redis.Redis) -> int:
    return sum(1 for _ in client.scan_iter(match=WORKER_KEY_PREFIX + "*", count=100))


def live_workers(client: redis.Redis) -> list[LiveWorker]:
    """The live workers with their device counts: one SCAN, one MGET."""
    keys = list(client.scan_iter(match=WORKER_KEY_PREFIX + "*", count=100))
    if not keys:
        return []
    found = []
    for key, raw in zip(keys, client.mget(keys), strict=True):
        if raw is None:  # expired between the scan and the read: gone
            continue
        name = key.decode() if isinstance(key, bytes) else str(key)
        found.append(LiveWorker(name[len(WORKER_KEY_PREFIX):], beat_devices(raw)))
    return found


def beat_devices(raw: bytes | str | None) -> int:
    """The devices a beat advertises; a beat without them (an older worker) is one."""
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        return 1
    devices = value.get("devices") if isinstance(value, dict) else None
    if isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        return devices
    return 1


def worker_node(worker: str | None) -> str | None:
    """The node name in a job's ``worker`` ("NODE:pid"), to match against live workers."""
    if not worker:
        return None
    node, _, pid = worker.rpartition(":")
    return node if node and pid.isdigit() else worker
