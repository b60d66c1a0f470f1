"""Every state change of a job, as a conditional DB write with a timestamp and an event.

Shared by the workers (claim, heartbeat, progress, succeed, requeue, finish) and the reconciler
(requeue, finish). A write that carries a worker's name happens only while that worker still
owns the job, so a worker that was paused and replaced can no longer change it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import (
    ColumnElement,
    and_,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from ftune.models.diagnosis import diagnose, multi_label_chance
from ftune.models.task_checks import MULTI_LABEL, SINGLE_LABEL, task_name
from ftune.service.dataset_versions import parts_of
from ftune.service.db.tables import (
    Dataset,
    EpochMetrics,
    Job,
    JobRun,
    Sweep,
    TunedModel,
    utcnow,
)
from ftune.service.db.writes import rows_changed
from ftune.service.events import EventKind, add_event, status_event
from ftune.service.job_status import ACTIVE, TERMINAL, JobStatus


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs of the job it has just claimed, read in the claim's transaction,
    so the run never reads the job row again for it."""

    id: str
    tenant_id: str
    attempts: int  # runs so far, this one included
    spec: dict
    dataset_id: str
    resolved: dict  # the auto choices recorded so far (at submit, and by earlier runs)
    max_runtime_s: float | None  # the job's own limit, if it set one
    seconds_run: float  # on workers before this run (its limit counts them)
    unlabeled_dataset_id: str | None
    # SHA-256 of each dataset's tar in the store (None: the dataset is gone or not stored).
    dataset_sha256: str | None
    unlabeled_sha256: str | None
    model_name: str  # what its model is called: the job's model_name, else the dataset's
    sweep_id: str | None  # set for a sweep's trial, whose pruner is asked after each epoch
    objective: str  # the sweep's metric a pruned trial's best epoch is chosen by
    kind: str = "finetune"  # a JobKind
    # The dataset's chain of versions, oldest first: (id, tar SHA-256, None when gone).
    dataset_parts: list[tuple[str, str | None]] = field(default_factory=list)


def claim(session: Session, job_id: str, worker: str, stale_after_s: float) -> ClaimedJob | None:
    """Mark the job running and return what its run needs; None when it must not run (gone,
    ended, cancelled, or running on another worker).

    Only an ``admitted`` job is claimed: a message for a job the dispatcher has not admitted
    (a stale duplicate) is ignored. A ``running`` job whose heartbeat stopped more than
    ``stale_after_s`` ago is claimed again: that is a redelivery after its worker died, and it
    resumes from its last checkpoint. One with a fresh heartbeat is left alone, so a duplicate
    delivery never trains it twice.
    """
    job = session.get(Job, job_id)
    if job is None or job.status in TERMINAL:
        return None
    if job.cancel_requested:
        finish(session, job_id, JobStatus.CANCELLED, error="cancelled")
        return None
    now = utcnow()
    previous_heartbeat = job.heartbeat_at
    if not _take(session, job, worker, stale_after_s, now):
        return None
    end_run(session, job_id, previous_heartbeat or now)  # a dead worker's run, if any
    session.add(JobRun(job_id=job_id, tenant_id=job.tenant_id, worker=worker, started_at=now))
    status_event(session, job_id, JobStatus.RUNNING, attempt=job.attempts, worker=worker)
    return _claimed(session, job)


def _take(session: Session, job: Job, worker: str, stale_after_s: float,
          now: datetime) -> bool:
    """The conditional UPDATE that makes the job this worker's; ``job`` is refreshed."""
    abandoned = and_(Job.status == JobStatus.RUNNING,
                     or_(Job.heartbeat_at.is_(None),
                         Job.heartbeat_at < now - timedelta(seconds=stale_after_s)))
    claimable = and_(Job.id == job.id, Job.cancel_requested.is_(False),
                     or_(Job.status == JobStatus.ADMITTED, abandoned))
    taken = rows_changed(session, update(Job).where(claimable).values(
        status=JobStatus.RUNNING, started_at=job.started_at or now, worker=worker,
        attempts=Job.attempts + 1, heartbeat_at=now, step=0, steps=0, hold_reason=None))
    session.flush()
    session.refresh(job)
    return taken > 0


def _claimed(session: Session, job: Job) -> ClaimedJob:
    dataset = session.get(Dataset, job.dataset_id)
    dataset_name = dataset.name if dataset is not None else None
    stored = dict(session.execute(select(Dataset.id, Dataset.blob_sha256).where(
        Dataset.id.in_([job.dataset_id, job.unlabeled_dataset_id or job.dataset_id]))).all())
    sweep = session.get(Sweep, job.sweep_id) if job.sweep_id is not None else None
    return ClaimedJob(
        id=job.id, tenant_id=job.tenant_id, attempts=job.attempts, spec=job.spec,
        dataset_id=job.dataset_id, resolved=dict(job.resolved or {}),
        max_runtime_s=job.max_runtime_s, seconds_run=run_seconds(session, job.id),
        unlabeled_dataset_id=job.unlabeled_dataset_id,
        dataset_sha256=stored.get(job.dataset_id),
        unlabeled_sha256=stored.get(job.unlabeled_dataset_id or ""),
        model_name=job.model_name or dataset_name or f"dataset-{job.dataset_id[:8]}",
        sweep_id=job.sweep_id,
        # A trial whose sweep is gone is still ranked, by the default objective.
        objective=sweep.objective if sweep is not None else "val_loss", kind=job.kind,
        dataset_parts=parts_of(session, dataset) if dataset is not None else [])


def end_run(session: Session, job_id: str, at: datetime | None = None) -> None:
    """Close the job's open run (compute quotas count it until then)."""
    session.execute(update(JobRun).where(JobRun.job_id == job_id, JobRun.ended_at.is_(None))
                    .values(ended_at=at or utcnow()))


def run_seconds(session: Session, job_id: str) -> float:
    """How long the job has run on workers so far (closed runs only)."""
    rows = session.execute(select(JobRun.started_at, JobRun.ended_at).where(
        JobRun.job_id == job_id, JobRun.ended_at.is_not(None)))
    # The query leaves out open runs; the test on ``ended`` tells the type checker so.
    return sum(((ended - started).total_seconds() for started, ended in rows
                if ended is not None), 0.0)


def _ours(job_id: str, worker: str, attempt: int | None = None) -> ColumnElement[bool]:
    """The job is still running on this worker (not taken over after a pause, say), in this
    attempt when one is given."""
    ours = and_(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.worker == worker)
    return ours if attempt is None else and_(ours, Job.attempts == attempt)


def owns(session: Session, job_id: str, worker: str, attempt: int) -> bool:
    """Whether this worker's attempt still runs the job: what a worker checks before it
    writes a checkpoint to the store (a stale attempt, its host cut off while another took
    the job over, must not)."""
    return session.scalar(select(func.count()).select_from(Job)
                          .where(_ours(job_id, worker, attempt))) == 1


def beat(session: Session, job_id: str, worker: str) -> bool:
    """Refresh the heartbeat; False when the job is no longer this worker's."""
    return bool(rows_changed(session, update(Job).where(_ours(job_id, worker))
                         .values(heartbeat_at=utcnow())))


def record_epoch(session: Session, job_id: str, worker: str, row: dict) -> bool:
    """Write the epoch's metrics; False (nothing written) when the job is no longer ours."""
    if not rows_changed(session, update(Job).where(_ours(job_id, worker)).values(
            epoch=int(row["epoch"]), step=0, heartbeat_at=utcnow())):
        return False
    # merge: a resumed run may finish an epoch the dead attempt had already reported.
    session.merge(EpochMetrics(job_id=job_id, epoch=int(row["epoch"]), row=row))
    add_event(session, job_id, EventKind.EPOCH, **row)
    return True


def recorded_epochs(session: Session, job_id: str) -> set[int]:
    """The epochs whose metrics rows the job has."""
    return set(session.scalars(select(EpochMetrics.epoch).where(EpochMetrics.job_id == job_id)))


def record_progress(session: Session, job_id: str, worker: str, epoch: int, step: int,
                    steps: int, loss: float, *, event: bool) -> str:
    """Write batch progress: "ok", "cancel" (requested meanwhile) or "lost" (not ours)."""
    if not rows_changed(session, update(Job).where(_ours(job_id, worker)).values(
            step=step, steps=steps, heartbeat_at=utcnow())):
        return "lost"
    if event:
        add_event(session, job_id, EventKind.PROGRESS, epoch=epoch, step=step, steps=steps,
                  loss=round(loss, 6))
    job = session.get(Job, job_id, populate_existing=True)
    return "cancel" if job is not None and job.cancel_requested else "ok"


def record_stage(session: Session, job_id: str, worker: str, stage: str, epochs: int,
                 stage_epochs: int = 0) -> bool:
    """The stage the run entered, the epochs it may now run in all (0: unchanged) and, for a
    stage that trains, its own (its first epoch is the one after those finished now)."""
    trains = stage_epochs > 0
    values: dict = {"stage": stage, "heartbeat_at": utcnow(),
                    "stage_start_epoch": Job.epoch if trains else None,
                    "stage_epochs": stage_epochs if trains else None}
    if epochs > 0:
        values["epochs"] = epochs
    if not rows_changed(session, update(Job).where(_ours(job_id, worker)).values(**values)):
        return False
    add_event(session, job_id, EventKind.STAGE, stage=stage,
              **({"epochs": epochs} if epochs else {}),
              **({"stage_epochs": stage_epochs} if trains else {}))
    return True


def record_pretrain_epoch(session: Session, job_id: str, worker: str, row: dict) -> bool:
    """A pretraining epoch ended: an event with its loss (pretraining has no metrics rows,
    whose epochs are the fine-tuning ones)."""
    if not rows_changed(session, update(Job).where(_ours(job_id, worker))
                    .values(heartbeat_at=utcnow())):
        return False
    add_event(session, job_id, EventKind.PRETRAIN, epoch=int(row["epoch"]), method=row["method"],
              loss=round(float(row["pretrain_loss"]), 6), seconds=round(row["seconds"], 2))
    return True


def record_resolved(session: Session, job_id: str, worker: str, resolved: dict) -> bool:
    """The auto choices made so far; an event names the ones that are new or changed."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.worker != worker or job.status != JobStatus.RUNNING:
        return False
    before = job.resolved or {}
    changed = {k: v for k, v in resolved.items() if before.get(k) != v}
    if changed:
        job.resolved = dict(resolved)
        add_event(session, job_id, EventKind.RESOLVED, **changed)
    return True


def job_gone(session: Session, job_id: str) -> bool:
    """Whether the job's row has been deleted (what a worker wrote for it then goes too)."""
    return session.scalar(select(Job.id).where(Job.id == job_id)) is None


def cancel_requested(session: Session, job_id: str) -> bool:
    job = session.get(Job, job_id, populate_existing=True)
    return job is None or job.cancel_requested


def succeed(session: Session, job_id: str, worker: str, model: TunedModel, best: dict,
            stopped_early: bool, diagnosis: list | None = None, *,
            attempt: int | None = None) -> bool:
    """Record the model and end the job; False (and nothing written) if it is no longer ours
    (this worker's, in ``attempt``) to finish, e.g. taken over by another worker."""
    done = rows_changed(session, update(Job).where(_ours(job_id, worker, attempt))
                    .values(status=JobStatus.SUCCEEDED, finished_at=utcnow(),
                            model_id=model.id, best=best, stopped_early=stopped_early,
                            error=None, step=0, diagnosis=diagnosis or []))
    if done:
        model.version = 1 + (session.scalar(select(func.max(TunedModel.version)).where(
            TunedModel.tenant_id == model.tenant_id, TunedModel.name == model.name)) or 0)
        session.add(model)
        end_run(session, job_id)
        status_event(session, job_id, JobStatus.SUCCEEDED, model_id=model.id)
    return bool(done)


def succeed_with_result(session: Session, job_id: str, worker: str, result: dict, *,
                        attempt: int | None = None) -> bool:
    """End a job that makes no model (a suggest job) with what it found; False (nothing
    written) if it is no longer ours to finish."""
    done = rows_changed(session, update(Job).where(_ours(job_id, worker, attempt))
                        .values(status=JobStatus.SUCCEEDED, finished_at=utcnow(),
                                result=result, error=None, step=0, diagnosis=[]))
    if done:
        end_run(session, job_id)
        status_event(session, job_id, JobStatus.SUCCEEDED)
    return bool(done)


def prune(session: Session, job_id: str, worker: str, objective: str) -> bool:
    """End a sweep's trial that its pruner stopped: ``pruned``, with its best epoch's
    metrics (by the sweep's objective) as ``best``; no model. False when not ours."""
    rows = [m.row for m in session.scalars(select(EpochMetrics).where(
        EpochMetrics.job_id == job_id).order_by(EpochMetrics.epoch))]
    scored = [r for r in rows if r.get(objective) is not None]
    sign = -1 if objective == "val_loss" else 1
    top = max(scored, key=lambda r: sign * r[objective]) if scored else {}
    best = ({k: top.get(k) for k in ("epoch", "val_accuracy", "val_loss", "val_map")
            if k in top} if top else None)
    done = rows_changed(session, update(Job).where(_ours(job_id, worker)).values(
        status=JobStatus.PRUNED, finished_at=utcnow(), best=best, error=None, step=0))
    if done:
        end_run(session, job_id)
        status_event(session, job_id, JobStatus.PRUNED, epoch=len(rows))
    return bool(done)


def finish(session: Session, job_id: str, status: str, *, error: str | None,
           worker: str | None = None, ran_until: datetime | None = None,
           only_from: tuple[str, ...] = ACTIVE) -> None:
    """End an active job (one in ``only_from``); with ``worker``, only while that worker
    still owns it. ``ran_until``: when a dead worker's run really ended (its last heartbeat)."""
    condition = (_ours(job_id, worker) if worker is not None
                 else and_(Job.id == job_id, Job.status.in_(only_from)))
    ended = rows_changed(session, update(Job).where(condition)
                     .values(status=status, finished_at=utcnow(), error=error))
    if ended:
        end_run(session, job_id, ran_until)
        job = session.get(Job, job_id, populate_existing=True)
        if job is not None:
            job.diagnosis = diagnose_stored(session, job, error)
        if job is not None and job.step > 0:
            # Stopped mid-epoch: the last progress event may be older (they are throttled);
            # this one makes the events end where the job view does.
            add_event(session, job_id, EventKind.PROGRESS, epoch=job.epoch + 1, step=job.step,
                      steps=job.steps)
        status_event(session, job_id, status, error=error)


def diagnose_stored(session: Session, job: Job, error: str | None) -> list:
    """The diagnosis of a job that ended without a model, from its stored metrics rows."""
    rows = [m.row for m in session.scalars(select(EpochMetrics).where(
        EpochMetrics.job_id == job.id).order_by(EpochMetrics.epoch))]
    dataset = session.get(Dataset, job.dataset_id)
    classes = len(dataset.classes) if dataset is not None else 0
    chance = None
    if dataset is not None and task_name((job.spec or {}).get("task", "auto"),
                                         dataset.task or SINGLE_LABEL) == MULTI_LABEL:
        chance = multi_label_chance((dataset.class_counts or {}).get("train") or {},
                                    (dataset.splits or {}).get("train") or 0)
    return diagnose(rows, num_classes=classes, error=error, chance=chance)


# A cancel requested while the run ended some other way (its worker lost, a transient error).
CANCELLED_AWAY = "cancelled while running (its run had stopped before it saw the request)"


def requeue(session: Session, job_id: str, reason: str, worker: str | None = None, *,
            retry_at: datetime | None = None, ran_until: datetime | None = None) -> bool:
    """Back to queued, to resume from its checkpoint; the dispatcher admits it again, not
    before ``retry_at``. A job asked to cancel ends cancelled instead: the dispatcher never
    admits a job with a cancel request, so queued it would wait forever (the soak found
    four). Returns whether it was queued."""
    condition = (_ours(job_id, worker) if worker is not None
                 else and_(Job.id == job_id, Job.status == JobStatus.RUNNING))
    done = rows_changed(session, update(Job).where(condition, Job.cancel_requested.is_(False))
                        .values(status=JobStatus.QUEUED, worker=None, step=0, steps=0,
                                admitted_at=None, retry_at=retry_at))
    if done:
        end_run(session, job_id, ran_until)
        status_event(session, job_id, JobStatus.QUEUED, reason=reason,
                     **({"retry_at": retry_at.isoformat()} if retry_at else {}))
        return True
    if session.scalar(select(Job.cancel_requested).where(condition)):
        finish(session, job_id, JobStatus.CANCELLED, worker=worker, ran_until=ran_until,
               only_from=(JobStatus.RUNNING,), error=CANCELLED_AWAY)
    return False


def replace_spec(session: Session, job_id: str, spec: dict, message: str) -> None:
    """The spec the job now runs with (e.g. a smaller batch after running out of memory)."""
    session.execute(update(Job).where(Job.id == job_id).values(spec=spec, epoch=0, step=0))
    session.execute(delete(EpochMetrics).where(EpochMetrics.job_id == job_id))
    add_event(session, job_id, EventKind.NOTE, message=message)
