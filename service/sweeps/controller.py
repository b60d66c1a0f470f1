"""Moves running sweeps on: starts trials while fewer than ``parallelism`` are active, and
ends the sweep when its trials are done or its time is up.

It runs inside the dispatcher (``advance_sweeps`` before each admission round), under the
dispatcher's Redis lock, so one process at a time creates trials: SQLite's single writer is
never raced, and no two processes ask the sampler for the same trial number. Everything it
knows comes from the tables, so an API or worker restart changes nothing.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from ftune.service.db.tables import Dataset, Job, Sweep, SweepTrial, utcnow
from ftune.service.errors import InvalidInput, TooManyRequests
from ftune.service.events import EventKind, add_event, status_event
from ftune.service.job_status import ACTIVE, JobStatus, SweepStatus
from ftune.service.jobs import new_job, request_cancel, validate_job_spec
from ftune.service.settings import Settings
from ftune.service.sweeps.space import apply_params, parse_space
from ftune.service.sweeps.study import DIRECTIONS, build_study, grid_size, next_params
from ftune.service.sweeps.trials import Trial, load_trials, records

log = logging.getLogger(__name__)


def advance_sweeps(session: Session, settings: Settings) -> None:
    for sweep in session.scalars(select(Sweep).where(Sweep.status == SweepStatus.RUNNING)
                                 .order_by(Sweep.created_at)):
        advance(session, settings, sweep)


def planned_trials(sweep: Sweep) -> int:
    """n_trials, or fewer when a grid has fewer points."""
    size = grid_size(parse_space(sweep.space)) if sweep.sampler == "grid" else None
    return min(sweep.n_trials, size) if size is not None else sweep.n_trials


def advance(session: Session, settings: Settings, sweep: Sweep) -> None:
    trials = load_trials(session, sweep)
    if sweep.max_total_s is not None and utcnow() - sweep.created_at > timedelta(
            seconds=sweep.max_total_s):
        for trial in load_trials(session, sweep, with_metrics=False, for_update=True):
            request_cancel(session, trial.job)
        end_sweep(session, sweep, trials, f"max_total_s ({sweep.max_total_s:g} s) ran out; "
                  "trials still running were cancelled")
        return
    active = sum(trial.job.status in ACTIVE for trial in trials)
    target = planned_trials(sweep)
    while active < sweep.parallelism and len(trials) < target:
        try:
            trials.append(_start_trial(session, settings, sweep, trials))
        except TooManyRequests as exc:  # a quota: try again on a later round
            _note_wait(session, sweep, f"waiting for quota: {exc.detail}")
            break
        except _DatasetGone:
            end_sweep(session, sweep, trials, "its dataset was deleted")
            return
        active += trials[-1].job.status in ACTIVE
    if len(trials) >= target and active == 0:
        end_sweep(session, sweep, trials, None)


class _DatasetGone(Exception):
    pass


def _start_trial(session: Session, settings: Settings, sweep: Sweep,
                 trials: list[Trial]) -> Trial:
    params = parse_space(sweep.space)
    study = build_study(objective=sweep.objective, sampler=sweep.sampler, pruner=sweep.pruner,
                        params=params, seed=sweep.seed,
                        n_trials=sweep.n_trials, records=records(trials, sweep.objective))
    values, attrs = next_params(study, params)
    spec_json = apply_params(sweep.base, values)
    dataset = session.get(Dataset, sweep.dataset_id)
    if dataset is None:
        raise _DatasetGone
    name = sweep.model_name or f"sweep-{sweep.id[:8]}"
    try:
        job = new_job(session, settings, dataset, validate_job_spec(spec_json),
                      priority=sweep.priority, model_name=name, sweep_id=sweep.id)
    except InvalidInput as exc:  # e.g. too big for the workers' memory: this trial fails
        job = _failed_job(session, sweep, spec_json, exc.detail)
    # Numbers are contiguous: a running sweep's trial jobs cannot be deleted (delete_job).
    row = SweepTrial(sweep_id=sweep.id, number=len(trials), job_id=job.id, params=values,
                     system_attrs=attrs, created_at=utcnow())
    session.add(row)
    session.flush()
    add_event(session, sweep.id, EventKind.TRIAL, number=row.number, job_id=job.id, params=values,
              status=job.status)
    if sweep.reason and sweep.reason.startswith("waiting"):
        sweep.reason = None
    log.info("sweep %s started trial %d (job %s): %s", sweep.id, row.number, job.id, values)
    return Trial(row, job, [])


def _failed_job(session: Session, sweep: Sweep, spec_json: dict, error: str) -> Job:
    now = utcnow()
    job = Job(tenant_id=sweep.tenant_id, dataset_id=sweep.dataset_id, spec=spec_json,
              epochs=0, status=JobStatus.FAILED, priority=sweep.priority, sweep_id=sweep.id,
              created_at=now, finished_at=now, error=error)
    session.add(job)
    session.flush()
    status_event(session, job.id, JobStatus.FAILED, error=error)
    return job


def _note_wait(session: Session, sweep: Sweep, reason: str) -> None:
    if sweep.reason != reason:
        sweep.reason = reason
        add_event(session, sweep.id, EventKind.NOTE, message=reason)


def best_trial(trials: list[Trial], objective: str) -> Trial | None:
    """The best trial that finished with a model (pruned trials have none)."""
    done = [t for t in trials if t.job.status == JobStatus.SUCCEEDED
            and (t.job.best or {}).get(objective) is not None]
    if not done:
        return None
    sign = 1 if DIRECTIONS[objective] == "maximize" else -1
    return max(done, key=lambda t: (sign * (t.job.best or {})[objective], -t.row.number))


def end_sweep(session: Session, sweep: Sweep, trials: list[Trial], reason: str | None) -> None:
    best = best_trial(trials, sweep.objective)
    counts = {s: sum(t.job.status == s for t in trials) for s in
              (JobStatus.SUCCEEDED, JobStatus.PRUNED, JobStatus.FAILED, JobStatus.CANCELLED)}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    sweep.status = SweepStatus.SUCCEEDED if best is not None else SweepStatus.FAILED
    sweep.reason = (f"{reason}; " if reason else "") + (f"trials: {summary}" if summary
                                                         else "no trials ran")
    sweep.finished_at = utcnow()
    add_event(session, sweep.id, EventKind.STATUS, status=sweep.status, reason=sweep.reason,
              best_trial=best.row.number if best else None)
    log.info("sweep %s %s: %s", sweep.id, sweep.status, sweep.reason)
