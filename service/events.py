"""Job events: written in the same transaction as the change they describe."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from ftune.service.db.tables import JobEvent, utcnow


def add_event(session: Session, job_id: str, kind: str, **data: object) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, data=data, created_at=utcnow()))


def status_event(session: Session, job_id: str, status: str, **data: object) -> None:
    add_event(session, job_id, "status", status=status, **data)


def events_after(session: Session, job_id: str, after_id: int, limit: int = 500) -> list[JobEvent]:
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id,
                                                       JobEvent.id > after_id)
                                .order_by(JobEvent.id).limit(limit)))
