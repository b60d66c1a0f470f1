"""Job service functions. Status changes are conditional UPDATEs, so the API and a worker
racing on the same job (cancel vs start) always agree on the outcome. Every function acts for
a principal: another tenant's job is a 404."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import redis
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from ftune.models import memory
from ftune.models.recipe.resolve import apply_static, image_passes, planned_epochs, resolve_static
from ftune.models.recipe.stats import DatasetStats, stats_from_report
from ftune.models.spec import FineTuneSpec, SpecError, parse_spec
from ftune.models.task_checks import (
    MULTI_LABEL,
    SINGLE_LABEL,
    VAL_WITHOUT_LABELS,
    task_name,
    task_problem,
)
from ftune.service.auth.principal import Principal, Role
from ftune.service.auth.tenancy import get_visible, visible_rows
from ftune.service.backbones import check_backbone
from ftune.service.blobs import deletions
from ftune.service.blobs.keys import prefixes_of
from ftune.service.datasets import get_dataset
from ftune.service.db.session import Database
from ftune.service.db.tables import (
    JOB_CHILDREN,
    Dataset,
    EpochMetrics,
    Job,
    Sweep,
    Tenant,
    TunedModel,
    utcnow,
)
from ftune.service.db.writes import rows_changed
from ftune.service.errors import Conflict, InvalidInput, Unavailable
from ftune.service.events import EventKind, add_event, status_event
from ftune.service.idempotency import create_once, forget
from ftune.service.job_status import (
    ACTIVE,
    TERMINAL,
    WAITING,
    JobKind,
    JobStatus,
    SweepStatus,
)
from ftune.service.lifecycle.transitions import finish
from ftune.service.pages import DEFAULT_LIMIT, Keyset, read_page
from ftune.service.quotas import check_job, limits_of, usage_of
from ftune.service.schemas import JobIn
from ftune.service.settings import Settings

# Above this, a job jumps its tenant's queue: only admins may ask for it.
MEMBER_MAX_PRIORITY = 5
# Jobs' Idempotency-Keys are stored as sent (they predate sweeps', which have a prefix).
JOB_KEYS = ""


def validate_job_spec(payload: FineTuneSpec | dict) -> FineTuneSpec:
    """The spec, checked for what HTTP clients may not ask for."""
    if isinstance(payload, FineTuneSpec):
        spec = payload
    elif isinstance(payload, dict):
        try:
            spec = parse_spec(payload)
        except SpecError as exc:
            raise InvalidInput(str(exc), loc=["spec"], kind="invalid_spec") from exc
    else:
        raise InvalidInput("spec: must be a JSON object (the engine's fine-tuning spec)")
    try:
        json.dumps(spec.model_dump(), allow_nan=False)
    except ValueError as exc:
        raise InvalidInput("spec: numbers must be finite (no NaN or Infinity)") from exc
    if spec.weights_path is not None:
        # A server path chosen by a client would let it read any file the worker can.
        raise InvalidInput("spec.weights_path: not accepted over HTTP; put weights in "
                           "FTUNE_WEIGHTS_DIR on the workers instead")
    return spec


def create_job(session: Session, principal: Principal, settings: Settings, *, request: JobIn
               ) -> Job:
    """A queued job in the dataset's tenant, within that tenant's quotas (429 otherwise)."""
    spec = validate_job_spec(request.spec)
    if request.priority > MEMBER_MAX_PRIORITY:
        principal.require(Role.ADMIN, f"priority above {MEMBER_MAX_PRIORITY}")
    dataset = get_dataset(session, principal, request.dataset_id)
    check_task(spec, dataset)  # before the unlabelled images: the task is the deeper problem
    unlabeled = unlabeled_dataset(session, principal, dataset, spec,
                                  request.unlabeled_dataset_id)
    return new_job(session, settings, dataset, spec, priority=request.priority,
                   max_runtime_s=request.max_runtime_s, model_name=request.model_name,
                   unlabeled_dataset_id=unlabeled.id if unlabeled is not None else None)


def unlabeled_dataset(session: Session, principal: Principal, dataset: Dataset,
                      spec: FineTuneSpec, unlabeled_id: str | None) -> Dataset | None:
    """The unlabelled dataset a job names, checked; 422 naming the field when the spec
    needs unlabelled images and neither dataset has any."""
    if dataset.kind == "unlabeled":
        raise InvalidInput(f"dataset_id: dataset {dataset.id} holds unlabelled images only; "
                           "train on a labelled dataset and name this one as "
                           "unlabeled_dataset_id")
    other = None
    if unlabeled_id is not None:
        other = get_dataset(session, principal, unlabeled_id)
        if other.kind != "unlabeled" or other.tenant_id != dataset.tenant_id:
            raise InvalidInput(f"unlabeled_dataset_id: dataset {other.id} is not a dataset "
                               "of unlabelled images of this tenant; upload them with the "
                               "form field kind=unlabeled")
        if not spec.uses_unlabeled:
            raise InvalidInput("unlabeled_dataset_id: unused, since the spec sets neither "
                               "pretrain.method nor pseudo_labels.rounds")
    if spec.uses_unlabeled and other is None and not (dataset.splits or {}).get("unlabeled"):
        field = ("spec.pretrain.method" if spec.pretrain.method != "none"
                 else "spec.pseudo_labels.rounds")
        raise InvalidInput(f"{field}: needs unlabelled images, and dataset {dataset.id} has "
                           "none; add an unlabeled/ folder beside its class folders (or "
                           "beside train/), or upload them with kind=unlabeled and name that "
                           "dataset as unlabeled_dataset_id")
    return other


def check_task(spec: FineTuneSpec, dataset: Dataset) -> str:
    """The task the job trains (422 when the spec cannot train it on this dataset)."""
    problem = task_problem(spec.task, dataset.task or SINGLE_LABEL,
                           monitor=spec.early_stopping.monitor,
                           pseudo_label_rounds=spec.pseudo_labels.rounds)
    if problem is not None:
        raise InvalidInput(f"spec: {problem}", loc=["spec"], kind="invalid_spec")
    task = task_name(spec.task, dataset.task or SINGLE_LABEL)
    val = (dataset.class_counts or {}).get("val")
    if task == MULTI_LABEL and (dataset.splits or {}).get("val") and not any((val or {}).values()):
        raise InvalidInput(f"dataset_id: {VAL_WITHOUT_LABELS}", loc=["dataset_id"])
    return task


def new_job(session: Session, settings: Settings, dataset: Dataset, spec: FineTuneSpec, *,
            priority: int, max_runtime_s: int | None = None, model_name: str | None = None,
            sweep_id: str | None = None, unlabeled_dataset_id: str | None = None) -> Job:
    """A queued job on ``dataset`` for its tenant: the submit-time choices made, quotas and
    worker memory checked (429 or 422 otherwise). Shared by submissions and sweep trials."""
    check_backbone(spec, settings)
    check_devices_cap(spec, settings)
    check_task(spec, dataset)
    tenant_id = dataset.tenant_id
    extra = session.get(Dataset, unlabeled_dataset_id) if unlabeled_dataset_id else None
    extra_unlabeled = (extra.splits or {}).get("unlabeled") or 0 if extra else 0
    resolved = resolve_static(spec, dataset_stats(dataset, spec, extra_unlabeled))
    check_job(usage_of(session, tenant_id), limits_of(session.get(Tenant, tenant_id), settings),
              epochs=image_passes(spec, resolved), images=dataset.num_images)
    _check_fits_a_worker(apply_static(spec, resolved), dataset, settings)
    job = Job(tenant_id=tenant_id, dataset_id=dataset.id, spec=spec.model_dump(mode="json"),
              epochs=planned_epochs(spec, resolved), status=JobStatus.QUEUED,
              priority=priority, max_runtime_s=max_runtime_s, model_name=model_name,
              resolved=resolved, sweep_id=sweep_id, unlabeled_dataset_id=unlabeled_dataset_id)
    session.add(job)
    session.flush()
    status_event(session, job.id, JobStatus.QUEUED, priority=priority)
    return job


def dataset_stats(dataset: Dataset, spec: FineTuneSpec, extra_unlabeled: int = 0
                  ) -> DatasetStats:
    """What the auto rules need, from the upload's lint report. Without a val split, the
    engine holds ``val_fraction`` of each class out of training. ``extra_unlabeled``: the
    images of the unlabelled dataset the job names."""
    counts = (dataset.class_counts or {}).get("train") or {}
    images = (dataset.splits or {}).get("train") or 0
    if (dataset.splits or {}).get("val") is None:
        counts = {c: max(1, round(n * (1 - spec.val_fraction))) for c, n in counts.items()}
        images = round(images * (1 - spec.val_fraction))
    unlabeled = ((dataset.splits or {}).get("unlabeled") or 0) + extra_unlabeled
    stats = stats_from_report(dataset.report, counts, unlabeled)
    task = task_name(spec.task, dataset.task or SINGLE_LABEL)
    if task == MULTI_LABEL:  # counts are each label's positives: the images are counted apart
        return replace(stats, images=images, task=task)
    return stats


def _check_fits_a_worker(spec: FineTuneSpec, dataset: Dataset, settings: Settings) -> None:
    """With FTUNE_WORKER_MEMORY_GB set, refuse at submit what no worker could run."""
    if settings.worker_memory_gb is None:
        return
    needed = memory.estimate(spec, num_classes=len(dataset.classes),
                             num_images=dataset.num_images,
                             decode_cache_bytes=settings.engine.decode_cache_bytes)
    capacity = settings.worker_memory_gb * 2**30
    if needed is not None and needed.total_bytes > capacity:
        raise InvalidInput(f"spec: this job needs {needed.describe()}, more than the workers' "
                           f"{settings.worker_memory_gb:g} GB; lower batch_size or image_size, "
                           "or freeze more of the backbone")


def check_devices_cap(spec: FineTuneSpec, settings: Settings) -> None:
    """With FTUNE_MAX_JOB_DEVICES set, refuse a job that asks for more devices. Without it,
    no live worker having that many is no reason to refuse: the job waits for one."""
    cap = settings.max_job_devices
    if cap is not None and isinstance(spec.devices, int) and spec.devices > cap:
        raise InvalidInput(f"spec.devices: {spec.devices} asked, more than the "
                           f"{cap} a job may have here (FTUNE_MAX_JOB_DEVICES); ask for "
                           f"{cap} or fewer, or auto")


def get_job(session: Session, principal: Principal, job_id: str) -> Job:
    """The job, if the principal may see it; another tenant's is a 404."""
    return get_visible(session, principal, Job, job_id, noun="job")


def list_jobs(session: Session, principal: Principal, *, status: str | None = None,
              limit: int = DEFAULT_LIMIT, cursor: str | None = None
              ) -> tuple[list[dict], str | None]:
    """Newest first, a page at a time, without per-epoch metrics (GET one job for those):
    two queries whatever the limit."""
    query = visible_rows(principal, Job)
    if status is not None:
        if status not in tuple(JobStatus):
            raise InvalidInput(f"status must be one of {', '.join(tuple(JobStatus))}")
        query = query.where(Job.status == status)
    jobs, next_cursor = read_page(session, query, Keyset(Job.created_at, Job.id), limit=limit,
                                  cursor=cursor)
    positions = queue_positions(session, [job for job in jobs if job.status in WAITING])
    return [job_summary(job, positions.get(job.id)) for job in jobs], next_cursor


def epoch_rows(session: Session, job_id: str) -> list[dict]:
    rows = session.scalars(select(EpochMetrics).where(EpochMetrics.job_id == job_id)
                           .order_by(EpochMetrics.epoch))
    return [row.row for row in rows]


def cancel_job(session: Session, principal: Principal, *, job_id: str) -> Job:
    """Waiting: cancelled now and never starts. Running: stops at the next batch boundary."""
    job = get_job(session, principal, job_id)
    request_cancel(session, job)
    if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.PRUNED):
        raise Conflict(f"job {job_id} already {job.status}; nothing to cancel")
    return job


def request_cancel(session: Session, job: Job) -> None:
    """Cancel a waiting job now, or ask a running one to stop; nothing for a finished one."""
    job_id = job.id
    # Two conditional updates; a job moving between waiting and running in between (a worker
    # claiming it, or handing it back) matches neither, so try again.
    for _ in range(5):
        cancelled_waiting = rows_changed(session, (
            update(Job).where(Job.id == job_id, Job.status.in_(WAITING))
            .values(status=JobStatus.CANCELLED, cancel_requested=True, finished_at=utcnow(),
                    error="cancelled before it started")))
        flagged_running = cancelled_waiting or rows_changed(session, (
            update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING)
            .values(cancel_requested=True)))
        session.flush()
        session.refresh(job)
        if flagged_running or job.status in TERMINAL:
            break
    if cancelled_waiting:
        status_event(session, job_id, JobStatus.CANCELLED, error="cancelled before it started")
    elif flagged_running:
        add_event(session, job_id, EventKind.NOTE,
                  message="cancel requested; stopping at the next batch")


def delete_job(session: Session, principal: Principal, *, job_id: str) -> list[str]:
    """A finished job, its metrics and events; returns the store prefixes of its checkpoints
    and logs, scheduled for deletion (``blobs.deletions.remove`` them after the commit). Its
    model (if any) is a separate object and goes first."""
    job = get_job(session, principal, job_id)
    if job.status in ACTIVE:
        raise Conflict(f"job {job_id} is {job.status}; cancel it first")
    if job.sweep_id is not None and session.scalar(select(Sweep.status).where(
            Sweep.id == job.sweep_id)) == SweepStatus.RUNNING:
        raise Conflict(f"job {job_id} is a trial of sweep {job.sweep_id}, which is running; "
                       "its sampler still learns from it")
    model = session.scalar(select(TunedModel.id).where(TunedModel.job_id == job_id))
    if model is not None:
        raise Conflict(f"job {job_id} made model {model}; delete the model first "
                       f"(DELETE /v1/models/{model})")
    delete_job_children(session, [job_id])
    session.delete(job)
    session.flush()
    return deletions.schedule(session, prefixes_of(jobs=[job_id]))


def delete_job_children(session: Session, job_ids: list[str]) -> None:
    """Every row that belongs to these jobs (``JOB_CHILDREN``), not the jobs themselves."""
    for column in JOB_CHILDREN:
        session.execute(delete(column.class_).where(column.in_(job_ids)))


def queue_position(session: Session, job: Job) -> int | None:
    """The job's place among its tenant's waiting jobs (1: next); None unless waiting."""
    return queue_positions(session, [job]).get(job.id)


def queue_positions(session: Session, jobs: list[Job]) -> dict[str, int]:
    """Each waiting job's place among its tenant's waiting jobs (1: next), in one query:
    admitted jobs come first (in the order they were admitted), then queued ones by priority
    and age. A tenant's waiting jobs are bounded by its active-jobs quota."""
    tenants = {job.tenant_id for job in jobs if job.status in WAITING}
    if not tenants:
        return {}
    rows = session.execute(select(Job.id, Job.tenant_id, Job.status, Job.priority,
                                  Job.created_at, Job.admitted_at)
                           .where(Job.tenant_id.in_(tenants), Job.status.in_(WAITING))).all()
    positions: dict[str, int] = {}
    for tenant in tenants:
        waiting = sorted((row for row in rows if row.tenant_id == tenant), key=_waiting_order)
        positions.update((row.id, place) for place, row in enumerate(waiting, start=1))
    return positions


def _waiting_order(row: Any) -> tuple:
    if row.status == JobStatus.ADMITTED:
        return (0, row.admitted_at or row.created_at, row.id)
    return (1, -row.priority, row.created_at, row.id)


def job_view(job: Job, metrics: list[dict], position: int | None = None) -> dict:
    suggestions = (job.result or {}).get("suggestions") if job.kind == JobKind.SUGGEST else None
    return {**job_summary(job, position), "metrics": metrics, "suggestions": suggestions}


def progress_of(job: Job) -> dict:
    """The epoch being trained (1-based, as the job's events number it) and the batch within
    it; between epochs, and once the job has ended, the last epoch finished."""
    mid_epoch = job.step > 0  # recording an epoch sets step back to 0
    epoch = job.epoch + 1 if mid_epoch else job.epoch
    start = job.stage_start_epoch  # set while a training stage runs
    return {"stage": job.stage, "epoch": epoch, "epochs": job.epochs,
            "epochs_done": job.epoch, "step": job.step, "steps": job.steps,
            "stage_epoch": None if start is None else epoch - start,
            "stage_epochs": None if start is None else job.stage_epochs}


def job_summary(job: Job, position: int | None = None) -> dict:
    """What a list shows of a job: everything but the per-epoch metrics."""
    return {
        "id": job.id,
        "tenant_id": job.tenant_id,
        "dataset_id": job.dataset_id,
        "unlabeled_dataset_id": job.unlabeled_dataset_id,
        "kind": job.kind,
        "status": job.status,
        "spec": job.spec,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "progress": progress_of(job),
        "best": job.best,
        "stopped_early": job.stopped_early,
        "error": job.error,
        "model_id": job.model_id,
        "cancel_requested": job.cancel_requested,
        "attempts": job.attempts,
        "priority": job.priority,
        "max_runtime_s": job.max_runtime_s,
        "queue_position": position,
        "hold_reason": job.hold_reason,
        "retry_at": job.retry_at,
        "resolved": job.resolved or {},
        "diagnosis": job.diagnosis,
        "sweep_id": job.sweep_id,
    }


def submit_job(db: Database, principal: Principal, settings: Settings, *, request: JobIn,
               idempotency_key: str | None, dispatch: Callable[[], object]) -> str:
    """Record a queued job and ask the dispatcher to start what it can; returns the job's id
    (an earlier job's, when the idempotency key was seen with the same request).

    When the queue is unreachable the job is marked failed (never left waiting without a way
    to start) and Unavailable raised: submitting again is safe.
    """
    job = create_once(db, principal, key=idempotency_key, prefix=JOB_KEYS,
                      body=request.model_dump(mode="json"),
                      create=lambda session: create_job(session, principal, settings,
                                                        request=request).id)
    if job.new:  # an earlier request with the key dispatched its job already
        dispatch_or_fail(db, principal, job.object_id, idempotency_key, dispatch)
    return job.object_id


def dispatch_or_fail(db: Database, principal: Principal, job_id: str,
                     idempotency_key: str | None, dispatch: Callable[[], object]) -> None:
    """Ask the dispatcher to start what it can; a queue that cannot be reached fails the
    job (it would never start) and answers 503."""
    try:
        dispatch()
    except (redis.RedisError, Unavailable) as exc:  # the lock or the broker unreachable
        with db.session() as session:
            # Only while it waits: should a worker have taken it after all, it runs.
            finish(session, job_id, JobStatus.FAILED, only_from=WAITING,
                   error="could not be queued: the job queue (Redis) is unreachable; "
                         "submit again")
            if idempotency_key is not None:  # submitting again with the key must try again
                forget(session, principal, key=idempotency_key, prefix=JOB_KEYS)
        raise Unavailable(f"the job queue (Redis) is unreachable: {exc}",
                          retry_after_s=5) from exc
