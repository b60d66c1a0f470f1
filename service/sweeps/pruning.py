"""The pruner's verdict on a running trial, asked by its worker after each epoch.

The worker has just recorded the epoch's metrics; the study is rebuilt with this trial as
running (its objective per epoch so far) and the other trials as they stand. What the pruner
records about the trial (successive halving's rungs) is written back to its row, so the next
rebuild sees it.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from ftune.service.db.tables import Job, Sweep
from ftune.service.job_status import SweepStatus
from ftune.service.sweeps.space import parse_space
from ftune.service.sweeps.study import build_study, should_prune
from ftune.service.sweeps.trials import load_trials, records


def prune_verdict(session: Session, job_id: str) -> bool:
    """True when the trial this job runs should stop now, as pruned."""
    job = session.get(Job, job_id)
    sweep = session.get(Sweep, job.sweep_id) if job is not None and job.sweep_id else None
    if sweep is None or sweep.pruner == "none" or sweep.status != SweepStatus.RUNNING:
        return False
    trials = load_trials(session, sweep)
    mine = next((t for t in trials if t.job.id == job_id), None)
    if mine is None or not mine.record(sweep.objective).intermediate:
        return False
    study = build_study(objective=sweep.objective, sampler="random", pruner=sweep.pruner,
                        params=parse_space(sweep.space), seed=sweep.seed,
                        n_trials=sweep.n_trials, records=records(trials, sweep.objective))
    verdict, attrs = should_prune(study, mine.row.number)
    if attrs != (mine.row.system_attrs or {}):
        mine.row.system_attrs = attrs
    return verdict
