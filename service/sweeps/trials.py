"""A sweep's trials as the study and the views see them, read from the trial rows, their
jobs and the jobs' epoch metrics in three queries."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from ftune.service.db.tables import EpochMetrics, Job, Sweep, SweepTrial
from ftune.service.sweeps.study import TrialRecord


@dataclass(frozen=True)
class Trial:
    row: SweepTrial
    job: Job
    rows: list[dict]  # the job's epoch metrics, in order

    def record(self, objective: str) -> TrialRecord:
        best = (self.job.best or {}).get(objective)
        intermediate = {int(r["epoch"]): float(r[objective]) for r in self.rows
                        if r.get(objective) is not None}
        return TrialRecord(self.row.number, self.row.params, self.job.status,
                           float(best) if best is not None else None, intermediate,
                           dict(self.row.system_attrs or {}))


def load_trials(session: Session, sweep: Sweep, *, with_metrics: bool = True,
                for_update: bool = False) -> list[Trial]:
    """The sweep's trials in order. ``for_update`` locks their jobs' rows (in id order) before
    anything else is written: a transaction that changes several trials must hold them all
    before it numbers a sweep event, or it deadlocks with a worker that changed one trial and
    waits for that event's number (``service/db/numbering.py``)."""
    rows = list(session.scalars(select(SweepTrial).where(SweepTrial.sweep_id == sweep.id)
                                .order_by(SweepTrial.number)))
    job_ids = [row.job_id for row in rows]
    query = select(Job).where(Job.id.in_(job_ids)).order_by(Job.id)
    if for_update:
        query = query.with_for_update().execution_options(populate_existing=True)
    jobs = {job.id: job for job in session.scalars(query)}
    metrics: dict[str, list[dict]] = {job_id: [] for job_id in job_ids}
    if with_metrics and job_ids:
        for m in session.scalars(select(EpochMetrics).where(EpochMetrics.job_id.in_(job_ids))
                                 .order_by(EpochMetrics.job_id, EpochMetrics.epoch)):
            metrics[m.job_id].append(m.row)
    return [Trial(row, jobs[row.job_id], metrics[row.job_id]) for row in rows
            if row.job_id in jobs]


def records(trials: list[Trial], objective: str) -> list[TrialRecord]:
    return [trial.record(objective) for trial in trials]
