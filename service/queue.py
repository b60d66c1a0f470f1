"""The queue contract, owned by the producer: queue and task names, the Celery app, enqueueing.

Celery carries only job ids; the job's state lives in the database. Workers build their app
with ``make_celery`` too and register the task under ``FINETUNE_TASK``.

Queues per device class: a job that needs ``d >= 2`` devices goes to ``training.d{d}``, every
other job to ``training``; a worker with ``k`` devices consumes ``training`` and
``training.d2`` .. ``training.d{k}``, so only a worker with enough devices takes a job.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from celery import Celery

from ftune.service.errors import Unavailable
from ftune.service.settings import Settings

log = logging.getLogger(__name__)

TRAINING_QUEUE = "training"
FINETUNE_TASK = "ftune.finetune"

_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5,
                  "interval_max": 1.0}


def make_celery(settings: Settings, *, include: Sequence[str] = ()) -> Celery:
    """The Celery app: one ``training`` queue, late acks, one job at a time per worker.

    ``include`` names task modules to import; only the worker passes one.
    """
    app = Celery("ftune", broker=settings.broker_url, include=list(include))
    app.conf.update(
        task_default_queue=TRAINING_QUEUE,
        task_routes={FINETUNE_TASK: {"queue": TRAINING_QUEUE}},
        # The DB holds job state; Celery only carries ids, so results are not stored.
        task_ignore_result=True,
        result_backend=None,
        # A job is acknowledged only when it ends, and a worker that dies mid-job gives it back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Redis redelivers unacknowledged messages after this; it must outlast any job.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s,
                                  "socket_connect_timeout": 3,
                                  # Ten priority lists, served most urgent first, each FIFO.
                                  "priority_steps": list(range(10)), "sep": ":",
                                  "queue_order_strategy": "priority"},
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


def job_devices(spec: Mapping[str, Any] | None) -> int:
    """The devices a job needs its worker to have, from its stored spec: ``auto`` (or a spec
    from before the field) runs on any worker, so 1."""
    value = (spec or {}).get("devices", "auto")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return 1


def training_queue(devices: int) -> str:
    """The queue of a job that needs ``devices`` devices."""
    return TRAINING_QUEUE if devices <= 1 else f"{TRAINING_QUEUE}.d{devices}"


def worker_queues(devices: int) -> list[str]:
    """The queues a worker with ``devices`` devices consumes, its largest class first: the
    transport keeps this order ("priority" strategy), so of two jobs of one priority an idle
    worker takes the one only it can run before one a smaller worker could take."""
    return [training_queue(d) for d in range(max(1, devices), 0, -1)]


def broker_priority(priority: int) -> int:
    """Ours: 9 is most urgent (as in AMQP). Kombu's Redis transport serves 0 first."""
    return 9 - priority


def enqueue_finetune(celery: Celery, job_id: str, priority: int, *, devices: int) -> None:
    """Hand a job id to the workers with at least ``devices`` devices (``job_devices`` of
    its spec); call only after the job row has committed."""
    try:
        # The task id is the job id, so the reconciler can tell which jobs the broker holds.
        celery.send_task(FINETUNE_TASK, args=[job_id], task_id=job_id,
                         queue=training_queue(devices),
                         priority=broker_priority(priority), retry=True,
                         retry_policy=_PUBLISH_RETRY)
    except Exception as exc:  # kombu raises several connection error types
        log.warning("could not enqueue job %s: %s", job_id, exc)
        raise Unavailable(f"the job queue (Redis) is unreachable: {exc}",
                          retry_after_s=5) from exc
