"""``ftune worker``: one Celery worker process, one job at a time, CUDA-safe (no fork)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

import redis
from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_ready,
    worker_shutting_down,
)

from ftune.service.db import migrate
from ftune.service.db.session import Database
from ftune.service.lifecycle.dispatcher import dispatch
from ftune.service.lifecycle.reconciler import reconcile
from ftune.service.logs import use_log_format
from ftune.service.queue import make_celery, worker_queues
from ftune.service.settings import Settings
from ftune.workers import tasks
from ftune.workers.heartbeat import Heartbeat
from ftune.workers.placement import WorkerDevices, parse_devices

log = logging.getLogger(__name__)


class _Upkeep:
    """What a worker does besides training: repair what the last crash left (at start-up) and
    dispatch the next job whenever one ends here (the API also does both periodically)."""

    def __init__(self, settings: Settings, app: Celery) -> None:
        self.settings, self.app = settings, app
        self.db = Database(settings.resolved_database_url)
        self.redis = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=3,
                                          socket_timeout=3)

    def at_start(self) -> None:
        try:
            reconcile(self.db, self.app, self.redis, self.settings)
        except Exception as exc:
            log.warning("start-up reconcile skipped: %s", exc)
        self.dispatch()
        log.info("start-up upkeep done")

    def dispatch(self) -> None:
        try:
            dispatch(self.db, self.app, self.redis, self.settings)
        except Exception as exc:  # the API's periodic dispatch catches up
            log.warning("dispatch after a job skipped: %s", exc)


def _require_current_schema(settings: Settings) -> None:
    """A worker never runs against a schema its release does not know (SchemaError says
    to run `ftune db upgrade`)."""
    db = Database(settings.resolved_database_url)
    try:
        migrate.require_current(db.engine)
    finally:
        db.dispose()


def _load_engine() -> None:
    """Import the engine (torch, timm, the training loop) before taking jobs: seconds that
    the first job would otherwise spend waiting, and that users see as a slow first job."""
    import time

    started = time.perf_counter()
    import ftune.models.bundle
    import ftune.models.training.fit  # noqa: F401

    log.info("engine loaded in %.1f s", time.perf_counter() - started)


def use_devices(settings: Settings, devices: str | None = None) -> WorkerDevices:
    """This worker's devices (``--devices``, else FTUNE_WORKER_DEVICES, else one), its GPUs
    made the only ones this process and its children see: before anything initialises
    CUDA."""
    text, source = ((devices, "--devices") if devices is not None
                    else (settings.worker_devices, "FTUNE_WORKER_DEVICES"))
    try:
        chosen = parse_devices(text, device=settings.engine.device)
        if text is not None:  # unset: the engine's device setting decides, as before
            os.environ.update(chosen.environment(os.environ.get("CUDA_VISIBLE_DEVICES")))
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from exc
    log.info("devices: %s %s", chosen.kind, ",".join(map(str, chosen.ids)))
    return chosen


def run_worker(settings: Settings, *, name: str | None = None, loglevel: str = "INFO",
               devices: str | None = None) -> None:
    """Consume the training queues of this worker's device count until stopped; the engine's
    device comes from ``settings.engine`` (``--device`` or ``FTUNE_DEVICE``), how many from
    ``devices`` (``--devices``) or FTUNE_WORKER_DEVICES."""
    owned = use_devices(settings, devices)
    _require_current_schema(settings)
    _load_engine()
    app = make_celery(settings, include=[tasks.__name__])
    upkeep = _Upkeep(settings, app)
    node = name or f"ftune-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    tasks.use_settings(settings, after_job=upkeep.dispatch, node=node, devices=owned)
    heartbeat = Heartbeat(settings.broker_url, node, settings.worker_heartbeat_s, owned)

    def on_ready(**_: object) -> None:
        # Counted as live only once Celery consumes from the queue, not while it starts up.
        heartbeat.start()
        threading.Thread(target=upkeep.at_start, daemon=True).start()

    def on_logging(logger: logging.Logger, **_: object) -> None:
        use_log_format(settings.log_format, logger)  # Celery has just set up its handlers

    def on_stopping(**_: object) -> None:
        # A stopping worker takes no new job: it leaves the live set now, not when its
        # process ends, so no dispatcher admits a job (or the one it hands back) to it.
        heartbeat.stop()

    worker_ready.connect(on_ready, weak=False)
    worker_shutting_down.connect(on_stopping, weak=False)
    after_setup_logger.connect(on_logging, weak=False)
    after_setup_task_logger.connect(on_logging, weak=False)
    try:
        # threads pool, concurrency 1: the job runs in a thread of this process, never in a
        # forked child, so CUDA initialised here stays valid; the main thread keeps talking
        # to the broker while the job trains.
        app.worker_main(["worker", "--pool=threads", "--concurrency=1",
                         f"--queues={','.join(worker_queues(owned.count))}",
                         f"--hostname={node}",
                         f"--loglevel={loglevel}", "--without-gossip", "--without-mingle"])
    finally:
        heartbeat.stop()
