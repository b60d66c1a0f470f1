"""Hand job ids to the workers through Celery (after the job row has committed)."""

from __future__ import annotations

import logging

from celery import Celery

from service.errors import Unavailable
from workers.celery_app import FINETUNE_TASK, TRAINING_QUEUE

log = logging.getLogger(__name__)

_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5,
                  "interval_max": 1.0}


def broker_priority(priority: int) -> int:
    """Ours: 9 is most urgent (as in AMQP). Kombu's Redis transport serves 0 first."""
    return 9 - priority


def enqueue_finetune(celery: Celery, job_id: str, priority: int = 5) -> None:
    try:
        # The task id is the job id, so the reconciler can tell which jobs the broker holds.
        celery.send_task(FINETUNE_TASK, args=[job_id], task_id=job_id, queue=TRAINING_QUEUE,
                         priority=broker_priority(priority), retry=True,
                         retry_policy=_PUBLISH_RETRY)
    except Exception as exc:  # kombu raises several connection error types
        log.warning("could not enqueue job %s: %s", job_id, exc)
        raise Unavailable(f"the job queue (Redis) is unreachable: {exc}") from exc
