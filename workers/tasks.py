"""The Celery task: thin and idempotent. It carries a job id; state lives in the DB."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

from celery import shared_task
from celery.exceptions import Reject
from celery.signals import worker_shutting_down

from ftune.service.db.session import Database
from ftune.service.queue import FINETUNE_TASK
from ftune.service.settings import Settings
from ftune.service.storage import Storage
from ftune.workers.placement import ONE_DEVICE, WorkerDevices
from ftune.workers.runner import JobRunner, RunLimits, RunTimings, WorkerShuttingDown

log = logging.getLogger(__name__)

# Set when the worker begins a warm shutdown: the running job stops at the next batch and
# goes back to the queue, to resume from its checkpoint on the next worker.
SHUTDOWN = threading.Event()

_runner: JobRunner | None = None
_after_job: Callable[[], None] | None = None  # the worker dispatches the next job


@worker_shutting_down.connect
def _on_shutdown(**_: object) -> None:
    SHUTDOWN.set()


def build_runner(settings: Settings, node: str | None = None,
                 devices: WorkerDevices = ONE_DEVICE) -> JobRunner:
    """``node``: the worker's Celery node name; it names the worker in the job's runs and
    events (with the process id: two workers may share a node name by mistake).
    ``devices``: what a job may train on here (``ftune worker --devices``)."""
    storage = Storage.for_settings(settings)
    storage.prepare()
    return JobRunner(Database(settings.resolved_database_url), storage,
                     worker_name=f"{node or socket.gethostname()}:{os.getpid()}",
                     timings=RunTimings(progress_s=settings.progress_interval_s,
                                        cancel_poll_s=settings.cancel_poll_s,
                                        heartbeat_s=settings.worker_heartbeat_s,
                                        stale_after_s=settings.job_stale_s),
                     limits=RunLimits(settings.max_runtime_s, settings.max_attempts,
                                      settings.retry_backoff_s), shutdown=SHUTDOWN,
                     derived=storage.derived, devices=devices)


def use_settings(settings: Settings, *, after_job: Callable[[], None] | None = None,
                 node: str | None = None, devices: WorkerDevices = ONE_DEVICE) -> None:
    """Run jobs with these settings (the worker process's, read once at start-up) on
    ``devices``; ``after_job`` runs whenever a job ends here."""
    global _runner, _after_job
    _runner = build_runner(settings, node, devices)
    _after_job = after_job


def runner() -> JobRunner:
    if _runner is None:  # a worker started without `ftune worker`: read the environment
        use_settings(Settings())
    assert _runner is not None
    return _runner


# Late acks and rejection on a lost worker are also the app's defaults (service/queue.py);
# the task states them too, so no app configuration can make a job's message vanish while
# it trains. There are no Celery retries: a job is retried by queueing it again in the DB.
@shared_task(name=FINETUNE_TASK, acks_late=True, reject_on_worker_lost=True)
def finetune(job_id: str) -> str:
    try:
        return runner().run(job_id)
    except WorkerShuttingDown:
        # The job is queued again in the database; the dispatcher admits it (with a new
        # message) when a worker is free, so this message is dropped.
        raise Reject("worker shutting down", requeue=False) from None
    finally:
        if _after_job is not None and not SHUTDOWN.is_set():
            _after_job()
