"""Job and sweep events: written in the same transaction as the change they describe. A
sweep's events are rows of the same table under the sweep's id (ids never collide), so one
poller wakes both kinds of event stream."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from ftune.service.db.tables import Job, JobEvent, SweepTrial, utcnow


def add_event(session: Session, subject_id: str, kind: str, /, **data: object) -> None:
    """An event of a job, or of a sweep (``subject_id`` is either's id)."""
    session.add(JobEvent(job_id=subject_id, kind=kind, data=data, created_at=utcnow()))


def status_event(session: Session, job_id: str, status: str, /, **data: object) -> None:
    add_event(session, job_id, "status", status=status, **data)
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
    add_event(session, job.sweep_id, "trial", number=number, job_id=job_id, status=status,
              epoch=job.epoch, best=job.best)


def events_after(session: Session, job_id: str, after_id: int, limit: int = 500) -> list[JobEvent]:
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id,
                                                       JobEvent.id > after_id)
                                .order_by(JobEvent.id).limit(limit)))
