"""``ftune worker``: one Celery worker process, one job at a time, CUDA-safe (no fork)."""

from __future__ import annotations

import logging
import os
import socket
import uuid

from celery.signals import worker_ready

from service.db.session import Database
from service.settings import Settings
from workers.celery_app import TRAINING_QUEUE, make_celery
from workers.heartbeat import Heartbeat

log = logging.getLogger(__name__)


def run_worker(settings: Settings, *, device: str | None = None, name: str | None = None,
               loglevel: str = "INFO") -> None:
    if device:
        os.environ["FTUNE_DEVICE"] = device  # the engine's automatic device choice honours it
    Database(settings.resolved_database_url).dispose()  # create tables before the first job
    app = make_celery(settings)
    node = name or f"ftune-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    heartbeat = Heartbeat(settings.broker_url, node, settings.worker_heartbeat_s)
    # Counted as live only once Celery consumes from the queue, not while it starts up.
    worker_ready.connect(lambda **_: heartbeat.start(), weak=False)
    try:
        # threads pool, concurrency 1: the job runs in a thread of this process, never in a
        # forked child, so CUDA initialised here stays valid; the main thread keeps talking
        # to the broker while the job trains.
        app.worker_main(["worker", "--pool=threads", "--concurrency=1",
                         f"--queues={TRAINING_QUEUE}", f"--hostname={node}",
                         f"--loglevel={loglevel}", "--without-gossip", "--without-mingle"])
    finally:
        heartbeat.stop()
