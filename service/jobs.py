"""Job service functions. Status changes are conditional UPDATEs, so the API and a worker
racing on the same job (cancel vs start) always agree on the outcome."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from celery import Celery
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ftune.models.spec import FineTuneSpec, SpecError, parse_spec
from ftune.service.db.session import Database
from ftune.service.db.tables import Dataset, EpochMetrics, IdempotencyKey, Job, utcnow
from ftune.service.errors import Conflict, InvalidInput, NotFound, Unavailable
from ftune.service.events import add_event, status_event
from ftune.service.ids import is_id
from ftune.service.job_status import TERMINAL, JobStatus
from ftune.service.queue import enqueue_finetune
from ftune.service.schemas import JobIn


def validate_job_spec(payload: Any) -> FineTuneSpec:
    if not isinstance(payload, dict):
        raise InvalidInput("spec: must be a JSON object (the engine's fine-tuning spec)")
    try:
        json.dumps(payload, allow_nan=False)
    except ValueError as exc:
        raise InvalidInput("invalid spec: numbers must be finite (no NaN or Infinity)") from exc
    try:
        spec = parse_spec(payload)
    except SpecError as exc:
        raise InvalidInput(str(exc)) from exc
    if spec.weights_path is not None:
        # A server path chosen by a client would let it read any file the worker can.
        raise InvalidInput("invalid spec: weights_path: not accepted over HTTP; put weights in "
                           "FTUNE_WEIGHTS_DIR on the workers instead")
    return spec


def create_job(session: Session, *, dataset_id: str, spec_payload: Any, priority: int = 5,
               max_runtime_s: int | None = None, model_name: str | None = None) -> Job:
    spec = validate_job_spec(spec_payload)
    if not is_id(dataset_id) or session.get(Dataset, dataset_id) is None:
        raise NotFound(f"dataset {dataset_id} not found")
    job = Job(dataset_id=dataset_id, spec=spec.model_dump(mode="json"), epochs=spec.epochs,
              status=JobStatus.QUEUED, priority=priority, max_runtime_s=max_runtime_s,
              model_name=model_name)
    session.add(job)
    session.flush()
    status_event(session, job.id, JobStatus.QUEUED, priority=priority)
    return job


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id) if is_id(job_id) else None
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def list_jobs(session: Session, *, status: str | None = None, limit: int = 100) -> list[Job]:
    query = select(Job).order_by(Job.created_at.desc()).limit(limit)
    if status is not None:
        if status not in tuple(JobStatus):
            raise InvalidInput(f"status must be one of {', '.join(tuple(JobStatus))}")
        query = query.where(Job.status == status)
    return list(session.scalars(query))


def epoch_rows(session: Session, job_id: str) -> list[dict]:
    rows = session.scalars(select(EpochMetrics).where(EpochMetrics.job_id == job_id)
                           .order_by(EpochMetrics.epoch))
    return [row.row for row in rows]


def cancel_job(session: Session, *, job_id: str) -> Job:
    """Queued: cancelled now and never starts. Running: stops at the next batch boundary."""
    job = get_job(session, job_id)
    # Two conditional updates; a job moving between queued and running in between (a worker
    # claiming it, or handing it back) matches neither, so try again.
    for _ in range(5):
        cancelled_queued = session.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED)
            .values(status=JobStatus.CANCELLED, cancel_requested=True, finished_at=utcnow(),
                    error="cancelled before it started")).rowcount
        flagged_running = cancelled_queued or session.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING)
            .values(cancel_requested=True)).rowcount
        session.flush()
        session.refresh(job)
        if flagged_running or job.status in TERMINAL:
            break
    if cancelled_queued:
        status_event(session, job_id, JobStatus.CANCELLED, error="cancelled before it started")
    elif flagged_running:
        add_event(session, job_id, "note", message="cancel requested; stopping at the next batch")
    if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise Conflict(f"job {job_id} already {job.status}; nothing to cancel")
    return job


def body_digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def replay_idempotent(session: Session, *, key: str, digest: str) -> Job | None:
    """The job an earlier request with this key made; 409 if that request's body differed."""
    if not key or len(key) > 200:
        raise InvalidInput("Idempotency-Key must be 1 to 200 characters")
    seen = session.get(IdempotencyKey, key)
    if seen is None:
        return None
    if seen.body_sha256 != digest:
        raise Conflict("Idempotency-Key was already used with a different request body")
    return get_job(session, seen.job_id)


def remember_idempotent(session: Session, *, key: str, digest: str, job_id: str) -> None:
    session.add(IdempotencyKey(key=key, body_sha256=digest, job_id=job_id))


def forget_idempotent(session: Session, *, key: str) -> None:
    seen = session.get(IdempotencyKey, key)
    if seen is not None:
        session.delete(seen)


def queue_position(session: Session, job: Job) -> int | None:
    """1 for the next job a free worker takes; None unless queued."""
    if job.status != JobStatus.QUEUED:
        return None
    ahead = session.scalar(select(func.count()).select_from(Job).where(
        Job.status == JobStatus.QUEUED,
        or_(Job.priority > job.priority,
            and_(Job.priority == job.priority, Job.created_at < job.created_at))))
    return int(ahead or 0) + 1


def job_view(job: Job, metrics: list[dict], position: int | None = None) -> dict:
    return {
        "id": job.id,
        "dataset_id": job.dataset_id,
        "status": job.status,
        "spec": job.spec,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "progress": {"epoch": job.epoch, "epochs": job.epochs, "step": job.step,
                     "steps": job.steps},
        "metrics": metrics,
        "best": job.best,
        "stopped_early": job.stopped_early,
        "error": job.error,
        "model_id": job.model_id,
        "cancel_requested": job.cancel_requested,
        "attempts": job.attempts,
        "priority": job.priority,
        "max_runtime_s": job.max_runtime_s,
        "queue_position": position,
    }


def submit_job(db: Database, celery: Celery, *, request: JobIn,
               idempotency_key: str | None) -> str:
    """Record a job and hand it to the workers; returns its id (an earlier job's, when the
    idempotency key was seen with the same request).

    The row is committed before the id is enqueued, so a worker always finds the job. When the
    queue is unreachable the job is marked failed (never left queued) and Unavailable raised.
    """
    digest = body_digest(request.model_dump(mode="json"))
    try:
        with db.session() as session:
            if idempotency_key is not None:
                earlier = replay_idempotent(session, key=idempotency_key, digest=digest)
                if earlier is not None:
                    return earlier.id
            job = create_job(session, dataset_id=request.dataset_id, spec_payload=request.spec,
                             priority=request.priority, max_runtime_s=request.max_runtime_s,
                             model_name=request.model_name)
            if idempotency_key is not None:
                remember_idempotent(session, key=idempotency_key, digest=digest, job_id=job.id)
    except IntegrityError:
        if idempotency_key is None:
            raise
        # The same key in a concurrent request won the race; its job is the answer.
        with db.session() as session:
            earlier = replay_idempotent(session, key=idempotency_key, digest=digest)
        if earlier is None:
            raise
        return earlier.id
    _enqueue_or_fail(db, celery, job.id, job.priority, idempotency_key)
    return job.id


def _enqueue_or_fail(db: Database, celery: Celery, job_id: str, priority: int,
                     idempotency_key: str | None) -> None:
    try:
        enqueue_finetune(celery, job_id, priority)
    except Unavailable:
        with db.session() as session:
            failed = get_job(session, job_id)
            failed.status, failed.finished_at = JobStatus.FAILED, utcnow()
            failed.error = "could not be queued: the job queue (Redis) is unreachable; submit again"
            status_event(session, job_id, JobStatus.FAILED, error=failed.error)
            if idempotency_key is not None:  # submitting again with the key must try again
                forget_idempotent(session, key=idempotency_key)
        raise
