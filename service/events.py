"""Job and sweep events: written in the same transaction as the change they describe. A
sweep's events are rows of the same table under the sweep's id (ids never collide), so one
poller wakes both kinds of event stream. Each subject's events are numbered 1, 2, 3 ... (the
SSE ``id:``), so a stream shows no gaps that other tenants' events made.

``EventKind`` is every kind an event row may have; ``JOB_EVENTS`` and ``SWEEP_EVENTS`` say
which kinds each stream carries and what each means there. The OpenAPI text of the two
``/events`` routes is generated from them (``describe_kinds``), so it cannot go stale.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ftune.service.db.numbering import insert_numbered
from ftune.service.db.tables import Job, JobEvent, SweepTrial, utcnow


class EventKind(StrEnum):
    """``job_events.kind``, and the SSE ``event:`` field clients switch on."""

    STATUS = "status"
    STAGE = "stage"
    RESOLVED = "resolved"
    PRETRAIN = "pretrain"
    EPOCH = "epoch"
    PROGRESS = "progress"
    NOTE = "note"
    TRIAL = "trial"


# What each kind means on a job's stream, in the order a run usually emits them.
JOB_EVENTS: Mapping[EventKind, str] = {
    EventKind.STATUS: "every change of state, with its reason, error or model",
    EventKind.STAGE: "the training stage entered, and the epochs it may now run",
    EventKind.RESOLVED: "automatic choices made or changed, named with their values",
    EventKind.PRETRAIN: "each pretraining epoch, with its loss",
    EventKind.EPOCH: "each epoch's metrics",
    EventKind.PROGRESS: "batch progress while training, about every 2 s (every "
                        "FTUNE_PROGRESS_INTERVAL_S when that is longer)",
    EventKind.NOTE: "retries, cancel requests, holds and spec changes, in words",
}

# What each kind means on a sweep's stream (rows under the sweep's id).
SWEEP_EVENTS: Mapping[EventKind, str] = {
    EventKind.STATUS: "the sweep's state, and why it ended",
    EventKind.TRIAL: "a trial queued, with its parameters, or changed state, with its best "
                     "metrics",
    EventKind.NOTE: "why the sweep waits to start trials (a quota), in words",
}


def describe_kinds(kinds: Mapping[EventKind, str]) -> str:
    """The kinds as prose for API docs: ``status`` (what it means), ..."""
    return ", ".join(f"``{kind}`` ({meaning})" for kind, meaning in kinds.items())


def add_event(session: Session, subject_id: str, kind: EventKind, /, **data: object) -> int:
    """An event of a job, or of a sweep (``subject_id`` is either's id); returns its number
    within the subject (1, 2, 3 ...), the stream's ``id:``."""
    return insert_numbered(session, JobEvent, "job_id", "seq", {
        "job_id": subject_id, "kind": str(kind), "data": data, "created_at": utcnow()})


def status_event(session: Session, job_id: str, status: str, /, **data: object) -> None:
    add_event(session, job_id, EventKind.STATUS, status=status, **data)
    _trial_event(session, job_id, status)


def _trial_event(session: Session, job_id: str, status: str) -> None:
    """A sweep's trial changed state: the sweep's event stream says so too (sweep events
    share this table, under the sweep's id). Its creation is announced by the controller."""
    if status == "queued":
        return
    # Columns, not the ORM object: the change was an UPDATE the identity map has not seen.
    job = session.execute(select(Job.sweep_id, Job.epoch, Job.best)
                          .where(Job.id == job_id)).first()
    if job is None or job.sweep_id is None:
        return
    number = session.scalar(select(SweepTrial.number).where(SweepTrial.job_id == job_id))
    add_event(session, job.sweep_id, EventKind.TRIAL, number=number, job_id=job_id, status=status,
              epoch=job.epoch, best=job.best)


def resume_point(session: Session, job_id: str, after_seq: int) -> int:
    """``after_seq``, or 0 when the subject has no event that high: an id kept from before
    events were numbered per job (a count across every job) would otherwise skip them all,
    the final status too; replaying from the start is what a client can cope with."""
    if after_seq == 0:
        return 0
    top = session.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id))
    return after_seq if after_seq <= (top or 0) else 0


def events_after(session: Session, job_id: str, after_seq: int, limit: int = 500
                 ) -> list[JobEvent]:
    """The subject's events numbered after ``after_seq`` (a ``Last-Event-ID``), in order."""
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id,
                                                       JobEvent.seq > after_seq)
                                .order_by(JobEvent.seq).limit(limit)))
