"""The worker's side of the job lifecycle: every transition is a DB write with a timestamp."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import and_, or_, update
from sqlalchemy.orm import Session

from service.db.tables import EpochMetrics, Job, JobStatus, TunedModel, utcnow


def claim(session: Session, job_id: str, worker: str, stale_after_s: float) -> Job | None:
    """Mark the job running and return it; None when it must not run (gone, ended, cancelled,
    or running on another worker).

    A ``running`` job whose heartbeat stopped more than ``stale_after_s`` ago is claimed again:
    that is a redelivery after its worker died, and it resumes from its last checkpoint. One
    with a fresh heartbeat is left alone, so a duplicate delivery never trains it twice.
    """
    job = session.get(Job, job_id)
    if job is None or job.status in JobStatus.TERMINAL:
        return None
    if job.cancel_requested:
        finish(session, job_id, JobStatus.CANCELLED, error="cancelled")
        return None
    now = utcnow()
    abandoned = and_(Job.status == JobStatus.RUNNING,
                     or_(Job.heartbeat_at.is_(None),
                         Job.heartbeat_at < now - timedelta(seconds=stale_after_s)))
    claimed = session.execute(
        update(Job).where(Job.id == job_id, Job.cancel_requested.is_(False),
                          or_(Job.status == JobStatus.QUEUED, abandoned))
        .values(status=JobStatus.RUNNING, started_at=job.started_at or now, worker=worker,
                attempts=Job.attempts + 1, heartbeat_at=now, step=0, steps=0)).rowcount
    session.flush()
    session.refresh(job)
    return job if claimed else None


def beat(session: Session, job_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                    .values(heartbeat_at=utcnow()))


def record_epoch(session: Session, job_id: str, row: dict) -> None:
    # merge: a resumed run may finish an epoch the dead attempt had already reported.
    session.merge(EpochMetrics(job_id=job_id, epoch=int(row["epoch"]), row=row))
    session.execute(update(Job).where(Job.id == job_id)
                    .values(epoch=int(row["epoch"]), step=0, heartbeat_at=utcnow()))


def record_progress(session: Session, job_id: str, step: int, steps: int) -> bool:
    """Write batch progress; return whether a cancel was requested meanwhile."""
    session.execute(update(Job).where(Job.id == job_id)
                    .values(step=step, steps=steps, heartbeat_at=utcnow()))
    return bool(session.get(Job, job_id, populate_existing=True).cancel_requested)


def cancel_requested(session: Session, job_id: str) -> bool:
    job = session.get(Job, job_id, populate_existing=True)
    return job is None or job.cancel_requested


def succeed(session: Session, job_id: str, model: TunedModel, best: dict,
            stopped_early: bool) -> bool:
    """Record the model and end the job; False (and nothing written) if it is no longer ours
    to finish, e.g. cancelled in the last moment."""
    done = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                           .values(status=JobStatus.SUCCEEDED, finished_at=utcnow(),
                                   model_id=model.id, best=best, stopped_early=stopped_early,
                                   error=None, step=0)).rowcount
    if done:
        session.add(model)
    return bool(done)


def finish(session: Session, job_id: str, status: str, *, error: str | None) -> None:
    session.execute(update(Job).where(Job.id == job_id, Job.status.in_(JobStatus.ACTIVE))
                    .values(status=status, finished_at=utcnow(), error=error))


def requeue(session: Session, job_id: str) -> None:
    """Back to queued (the worker is shutting down); the message goes back to the broker."""
    session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                    .values(status=JobStatus.QUEUED, worker=None, step=0, steps=0))
