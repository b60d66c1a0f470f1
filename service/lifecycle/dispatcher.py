"""The dispatcher: the one place that decides which queued job starts next.

Jobs wait in the database as ``queued``. When a worker is free, the dispatcher admits jobs to
the broker (``admitted``), at most as many as there are free workers, so the broker never holds
a backlog that would bypass these rules:

- **Fair share across tenants**: the next job is the oldest waiting job of the tenant with the
  fewest jobs on workers; ties go to the tenant that used the least compute in the last 24 h.
- **Within a tenant**: priority (9 first), then first come, first served.
- **Run-time quotas**: a tenant at its running-jobs limit or over its compute hours waits; its
  jobs show why (``hold_reason``, and a note event when the reason changes).
- **Retry times**: a job back from a transient failure waits until its ``retry_at``.
- **Devices**: a job goes only to a free worker with at least the devices it asks for
  (``spec.devices``; ``auto`` needs one), the smallest that fits (``capacity.py``); it goes
  to that device class's queue (``queue.training_queue``). A job that asks for more than any
  live worker has says so in its ``hold_reason``; one whose workers are only busy just waits.

Why admit from the database instead of enqueueing everything and letting Celery order it: the
broker only knows priorities, not tenants or quotas, and whatever sits in it is out of reach.
Keeping the backlog in the database makes every rule a query, survives a Redis restart, and
lets sweeps add their trials as queued jobs in the same place (``_advance_sweeps``, first in
each round).

It runs in the API (after a submission, and every ``FTUNE_DISPATCH_INTERVAL_S``) and in each
worker when it finishes a job, under a Redis lock so two processes never admit at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

import redis
from celery import Celery
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from ftune.service.db.session import Database
from ftune.service.db.tables import Job, Tenant, utcnow
from ftune.service.db.writes import rows_changed
from ftune.service.events import EventKind, add_event
from ftune.service.job_status import JobStatus
from ftune.service.lifecycle.capacity import FreeWorkers, device_hold, free_workers
from ftune.service.lifecycle.liveness import LiveWorker, live_workers
from ftune.service.queue import enqueue_finetune, job_devices
from ftune.service.quotas import RUNNING, Limits, compute_seconds, limits_of
from ftune.service.settings import Settings
from ftune.service.sweeps.controller import advance_sweeps

log = logging.getLogger(__name__)

LOCK_KEY = "ftune:dispatcher"


class Admission(NamedTuple):
    job_id: str
    priority: int
    devices: int  # the job's need: which queue it goes to


class _Waiting(NamedTuple):
    id: str
    priority: int
    created_at: datetime
    devices: int


@dataclass
class _Tenant:
    id: str
    limits: Limits
    running: int = 0
    compute_s: float = 0.0
    waiting: list[_Waiting] = field(default_factory=list)  # in the order they start

    def next_fitting(self, pool: FreeWorkers) -> _Waiting | None:
        """Its first waiting job a free worker can run: one that needs more devices than any
        free worker has does not keep its smaller jobs off the free workers."""
        return next((job for job in self.waiting if pool.fits(job.devices)), None)

    def hold(self) -> str | None:
        """Why this tenant's jobs may not start now (a run-time quota), or None."""
        if self.running >= self.limits.running_jobs:
            return (f"quota running_jobs: {self.running} of {self.limits.running_jobs} jobs "
                    "running; starts when one of them ends")
        if self.compute_s >= self.limits.compute_s:
            return (f"quota compute_hours: {_hours(self.compute_s)} of "
                    f"{_hours(self.limits.compute_s)} worker hours used in the last 24 h; "
                    "starts as that window moves on")
        return None


def _hours(seconds: float) -> str:
    """Hours, to the hundredth, or more digits below that: a quota of 0.0001 h must not
    read 0.00."""
    hours = seconds / 3600
    return f"{hours:.2f}" if hours >= 0.01 else f"{hours:.6f}".rstrip("0").rstrip(".")


def dispatch(db: Database, celery: Celery, client: redis.Redis, settings: Settings) -> list[str]:
    """Admit waiting jobs to free workers (the live ones, with their devices, from Redis);
    returns the ids admitted (in order)."""
    lock = client.lock(LOCK_KEY, timeout=30, blocking_timeout=10)
    if not lock.acquire():
        return []  # another process is dispatching right now
    try:
        _advance_sweeps(db, settings)
        workers = live_workers(client)
        with db.session() as session:
            admitted = admit(session, settings, workers=workers)
        # After the commit: workers find it. Largest need first: an idle worker waiting on
        # its own device class's queue takes its job before the next one lands in `training`.
        for job in sorted(admitted, key=lambda a: -a.devices):
            enqueue_finetune(celery, job.job_id, job.priority, devices=job.devices)
    finally:
        with contextlib.suppress(redis.exceptions.LockError):  # expired: someone else's now
            lock.release()
    if admitted:
        log.info("dispatcher admitted %s", [job.job_id for job in admitted])
    return [job.job_id for job in admitted]


def _advance_sweeps(db: Database, settings: Settings) -> None:
    """Sweeps start their next trials (queued jobs, admitted below like any other). Under the
    dispatcher's lock: one process at a time asks the samplers and writes trials."""
    try:
        with db.session() as session:
            advance_sweeps(session, settings)
    except Exception:  # a sweep's trouble must not stop every other job from starting
        log.exception("advancing sweeps failed; jobs are still dispatched")


def admit(session: Session, settings: Settings, *,
          workers: Sequence[LiveWorker]) -> list[Admission]:
    """Choose and mark the jobs to start on the live ``workers``; records why others are
    held back."""
    tenants = _waiting_by_tenant(session, settings)
    _record_holds(session, tenants, workers)
    occupying = session.execute(select(Job.worker, Job.status, Job.spec)
                                .where(Job.status.in_(RUNNING))).all()
    pool = free_workers(workers, [(worker if status == JobStatus.RUNNING else None,
                                   job_devices(spec)) for worker, status, spec in occupying])
    chosen: list[Admission] = []
    while True:
        fitting = {t.id: job for t in tenants.values() if t.hold() is None
                   and (job := t.next_fitting(pool)) is not None}
        if not fitting:
            break
        tenant = min((tenants[i] for i in fitting),
                     key=lambda t: (t.running, t.compute_s, fitting[t.id].created_at))
        job = fitting[tenant.id]
        tenant.waiting.remove(job)
        taken = rows_changed(session, update(Job).where(Job.id == job.id,
                                                        Job.status == JobStatus.QUEUED)
                             .values(status=JobStatus.ADMITTED, admitted_at=utcnow(),
                                     hold_reason=None))
        if taken:
            tenant.running += 1
            pool.take(job.devices)
            chosen.append(Admission(job.id, job.priority, job.devices))
    return chosen


def _waiting_by_tenant(session: Session, settings: Settings) -> dict[str, _Tenant]:
    now = utcnow()
    rows = session.execute(
        select(Job.id, Job.tenant_id, Job.priority, Job.created_at, Job.spec).where(
            Job.status == JobStatus.QUEUED, Job.cancel_requested.is_(False),
            or_(Job.retry_at.is_(None), Job.retry_at <= now))
        .order_by(Job.priority.desc(), Job.created_at, Job.id)).all()
    ids = sorted({row.tenant_id for row in rows})
    if not ids:
        return {}
    quotas = {t.id: t for t in session.scalars(select(Tenant).where(Tenant.id.in_(ids)))}
    tenants = {i: _Tenant(i, limits_of(quotas.get(i), settings)) for i in ids}
    for tenant_id, count in session.execute(
            select(Job.tenant_id, func.count()).where(Job.tenant_id.in_(ids),
                                                      Job.status.in_(RUNNING))
            .group_by(Job.tenant_id)):
        tenants[tenant_id].running = int(count)
    for tenant_id, seconds in compute_seconds(session, ids, now).items():
        tenants[tenant_id].compute_s = seconds
    for job_id, tenant_id, priority, created_at, spec in rows:
        tenants[tenant_id].waiting.append(_Waiting(job_id, priority, created_at,
                                                   job_devices(spec)))
    return tenants


def _record_holds(session: Session, tenants: dict[str, _Tenant],
                  workers: Sequence[LiveWorker]) -> None:
    """Show on each waiting job why it waits (its tenant's quota, else devices no live worker
    has); a note event when the reason changes."""
    wanted: dict[str | None, list[str]] = defaultdict(list)
    for tenant in tenants.values():
        quota = tenant.hold()
        for job in tenant.waiting:
            wanted[quota or device_hold(job.devices, workers)].append(job.id)
    for reason, ids in wanted.items():
        changed = session.scalars(select(Job.id).where(
            Job.id.in_(ids), Job.hold_reason.is_distinct_from(reason))).all()
        if not changed:
            continue
        session.execute(update(Job).where(Job.id.in_(changed)).values(hold_reason=reason))
        for job_id in changed:
            add_event(session, job_id, EventKind.NOTE,
                      message=f"held back: {reason}" if reason else "no longer held back")
