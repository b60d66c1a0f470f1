"""The worker process's heartbeat: a thread that keeps this worker's Redis key alive, so the
API counts it as live even while a job trains (see ``service.lifecycle.liveness``)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time

import redis

from ftune.service.lifecycle.liveness import worker_key, worker_key_ttl_s
from ftune.workers.placement import ONE_DEVICE, WorkerDevices

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, redis_url: str, name: str, interval_s: float,
                 devices: WorkerDevices = ONE_DEVICE) -> None:
        self.client = redis.Redis.from_url(redis_url, socket_connect_timeout=3, socket_timeout=3)
        self.key, self.interval, self.devices = worker_key(name), interval_s, devices
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ftune-heartbeat", daemon=True)

    def start(self) -> None:
        self._beat()  # live from now on, before anything counts the workers
        self._thread.start()

    def _beat(self) -> None:
        try:
            self.client.set(self.key, json.dumps(beat_payload(self.devices)),
                            ex=worker_key_ttl_s(self.interval))
        except redis.RedisError as exc:
            log.warning("heartbeat to Redis failed: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            self.client.delete(self.key)


def beat_payload(devices: WorkerDevices = ONE_DEVICE) -> dict:
    """What a beat tells the API: when it was sent, the devices a job may train on here (the
    dispatcher places jobs by them) and, on a GPU, the memory the training holds (torch is
    only asked once a job has loaded it)."""
    payload: dict = {"at": time.time(), "devices": devices.count, "device_kind": devices.kind}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        payload["gpu_allocated_bytes"] = int(torch.cuda.memory_allocated())
        payload["gpu_reserved_bytes"] = int(torch.cuda.memory_reserved())
    return payload
