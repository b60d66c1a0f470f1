"""The reconciler: no job stays lost or stuck. The DB is the source of truth, so it repairs
the broker from the DB, never the other way round.

- A running job whose heartbeat stopped (its worker died) is queued again, to resume from its
  last checkpoint; after ``max_attempts`` runs it fails with a clear message.
- A queued job whose message is gone from Redis (Redis restarted empty) is enqueued again.
Duplicate messages are harmless: a worker claims a job only once (see ``transitions.claim``).
Runs at API and worker start-up and then periodically in every API process.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import timedelta

import redis
from celery import Celery
from sqlalchemy import or_, select

from ftune.service.db.session import Database
from ftune.service.db.tables import Job, utcnow
from ftune.service.events import add_event
from ftune.service.job_status import JobStatus
from ftune.service.lifecycle import transitions
from ftune.service.queue import TRAINING_QUEUE, enqueue_finetune
from ftune.service.settings import Settings
from ftune.service.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class Repairs:
    requeued: list[str] = field(default_factory=list)  # abandoned running jobs
    failed: list[str] = field(default_factory=list)  # abandoned too often
    reenqueued: list[str] = field(default_factory=list)  # queued, but lost from the broker


def broker_job_ids(client: redis.Redis) -> set[str]:
    """Job ids with a message in Redis: waiting in a priority list, or delivered, unacked."""
    ids: set[str] = set()
    for key in client.scan_iter(match=f"{TRAINING_QUEUE}*", count=100):
        if client.type(key) == b"list":
            ids.update(_message_id(raw) for raw in client.lrange(key, 0, -1))
    for raw in client.hvals("unacked"):
        ids.add(_message_id(json.dumps(json.loads(raw)[0])))
    ids.discard("")
    return ids


def _message_id(raw: bytes | str) -> str:
    try:
        return str(json.loads(raw).get("headers", {}).get("id") or "")
    except (ValueError, AttributeError):
        return ""


def reconcile(db: Database, celery: Celery, client: redis.Redis, settings: Settings,
              storage: Storage | None = None) -> Repairs:
    repairs = Repairs()
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.job_stale_s)
    with db.session() as session:
        abandoned = session.scalars(select(Job).where(
            Job.status == JobStatus.RUNNING,
            or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before))).all()
        for job in abandoned:
            if job.attempts >= settings.max_attempts:
                transitions.finish(session, job.id, JobStatus.FAILED, error=(
                    f"its worker stopped responding {job.attempts} time(s) (killed, out of "
                    "memory or lost); giving up. Try a smaller batch_size or image_size."))
                repairs.failed.append(job.id)
                if storage is not None:
                    storage.remove_job_files(job.id)
            elif transitions.requeue(session, job.id, "its worker stopped sending heartbeats"):
                repairs.requeued.append(job.id)
        grace = now - timedelta(seconds=max(5.0, settings.reconcile_interval_s))
        waiting = list(session.execute(select(Job.id, Job.priority).where(
            Job.status == JobStatus.QUEUED, Job.created_at < grace)))
    in_broker = broker_job_ids(client)
    priorities = dict(waiting)
    lost = [job_id for job_id, _ in waiting if job_id not in in_broker
            and job_id not in repairs.requeued]
    for job_id in repairs.requeued + lost:
        enqueue_finetune(celery, job_id, priorities.get(job_id, 5))
    if lost:
        with db.session() as session:
            for job_id in lost:
                add_event(session, job_id, "note",
                          message="enqueued again: its message was missing from the broker")
        repairs.reenqueued = lost
    if repairs.requeued or repairs.failed or repairs.reenqueued:
        log.warning("reconciler: requeued %s, failed %s, re-enqueued %s", repairs.requeued,
                    repairs.failed, repairs.reenqueued)
    return repairs
