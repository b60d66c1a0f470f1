"""The reconciler: no job stays lost or stuck. The DB is the source of truth, so it repairs
the broker from the DB, never the other way round.

- A running job whose heartbeat stopped (its worker died) is queued again, for the dispatcher
  to admit it and a worker to resume it from its last checkpoint; after ``max_attempts`` runs it
  fails with a clear message.
- An admitted job whose message is gone from Redis (Redis restarted empty) is enqueued again.
- An admitted job no worker started within ``job_stale_s`` goes back to the dispatcher.
Queued jobs are the dispatcher's: the reconciler never enqueues them, so it cannot undo the
dispatcher's fair share or quotas. Duplicate messages are harmless: a worker claims a job only
once (see ``transitions.claim``). Runs at API and worker start-up and periodically in every API
process.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis
from celery import Celery
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from ftune.service.blobs import deletions
from ftune.service.blobs.keys import checkpoints_prefix
from ftune.service.db.session import Database
from ftune.service.db.tables import Job, utcnow
from ftune.service.db.writes import rows_changed
from ftune.service.events import EventKind, add_event, status_event
from ftune.service.job_status import JobStatus
from ftune.service.lifecycle import transitions
from ftune.service.queue import TRAINING_QUEUE, enqueue_finetune, job_devices
from ftune.service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Repairs:
    requeued: list[str] = field(default_factory=list)  # abandoned running jobs
    failed: list[str] = field(default_factory=list)  # abandoned too often
    cancelled: list[str] = field(default_factory=list)  # abandoned with a cancel requested
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


def reconcile(db: Database, celery: Celery, client: redis.Redis, settings: Settings) -> Repairs:
    repairs = Repairs()
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.job_stale_s)
    with db.session() as session:
        _abandoned(session, repairs, stale_before, settings.max_attempts)
        _unclaimed(session, repairs, stale_before)
        grace = now - timedelta(seconds=max(5.0, settings.reconcile_interval_s))
        admitted = list(session.execute(select(Job.id, Job.priority, Job.spec).where(
            Job.status == JobStatus.ADMITTED, Job.admitted_at < grace)))
    # Admitted jobs whose message is gone (Redis restarted empty) are enqueued again, to the
    # queue of their device class as the dispatcher chose it. Queued jobs have no message by
    # design: the dispatcher admits them.
    in_broker = broker_job_ids(client)
    lost = [(job_id, priority, spec) for job_id, priority, spec in admitted
            if job_id not in in_broker]
    for job_id, priority, spec in lost:
        enqueue_finetune(celery, job_id, priority, devices=job_devices(spec))
    if lost:
        with db.session() as session:
            for job_id, _, _ in lost:
                add_event(session, job_id, EventKind.NOTE,
                          message="enqueued again: its message was missing from the broker")
        repairs.reenqueued = [job_id for job_id, _, _ in lost]
    if repairs.requeued or repairs.failed or repairs.reenqueued or repairs.cancelled:
        log.warning("reconciler: requeued %s, failed %s, re-enqueued %s, cancelled %s",
                    repairs.requeued, repairs.failed, repairs.reenqueued, repairs.cancelled)
    return repairs


def _abandoned(session: Session, repairs: Repairs, stale_before: datetime,
               max_attempts: int) -> None:
    """Running jobs whose worker stopped sending heartbeats: queued again to resume, or
    failed after too many runs. Their run ended at their last heartbeat."""
    abandoned = session.scalars(select(Job).where(
        Job.status == JobStatus.RUNNING,
        or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before))).all()
    for job in abandoned:
        if job.attempts >= max_attempts:
            transitions.finish(session, job.id, JobStatus.FAILED, ran_until=job.heartbeat_at,
                               error=(f"its worker stopped responding {job.attempts} time(s) "
                                      "(killed, out of memory or lost); giving up. Try a "
                                      "smaller batch_size or image_size."))
            repairs.failed.append(job.id)
            # Removed from the store by the API's upkeep (blobs.deletions).
            deletions.schedule(session, [checkpoints_prefix(job.id)])
        elif transitions.requeue(session, job.id, "its worker stopped sending heartbeats",
                                 ran_until=job.heartbeat_at):
            repairs.requeued.append(job.id)
        elif job.cancel_requested:  # requeue ended it cancelled: its checkpoints go
            repairs.cancelled.append(job.id)
            deletions.schedule(session, [checkpoints_prefix(job.id)])


def _unclaimed(session: Session, repairs: Repairs, stale_before: datetime) -> None:
    """Admitted long ago and never claimed: its message sits with a worker that died before
    starting it (Redis would redeliver it only after the visibility timeout). The dispatcher
    admits it again."""
    stuck = session.scalars(select(Job.id).where(Job.status == JobStatus.ADMITTED,
                                                 Job.admitted_at < stale_before)).all()
    for job_id in stuck:
        done = rows_changed(session, update(Job).where(Job.id == job_id,
                                                       Job.status == JobStatus.ADMITTED)
                            .values(status=JobStatus.QUEUED, admitted_at=None))
        if done:
            status_event(session, job_id, JobStatus.QUEUED,
                         reason="no worker started it in time; it will be admitted again")
            repairs.requeued.append(job_id)
