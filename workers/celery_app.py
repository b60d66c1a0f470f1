"""The Celery app: one ``training`` queue, late acks, one job at a time per worker process."""

from __future__ import annotations

from celery import Celery

from service.settings import Settings

TRAINING_QUEUE = "training"
FINETUNE_TASK = "ftune.finetune"


def make_celery(settings: Settings) -> Celery:
    app = Celery("ftune", broker=settings.broker_url, include=["workers.tasks"])
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
