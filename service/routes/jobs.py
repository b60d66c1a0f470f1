from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from service.context import AppContext, get_context
from service.db.tables import JobStatus, utcnow
from service.errors import Unavailable
from service.jobs import cancel_job, create_job, epoch_rows, get_job, job_view, list_jobs
from service.queue import enqueue_finetune
from service.schemas import JobIn, JobOut, JobStatusName

router = APIRouter(tags=["jobs"])
Ctx = Annotated[AppContext, Depends(get_context)]


@router.post("/jobs", status_code=202, response_model=JobOut)
def submit(body: JobIn, ctx: Ctx) -> dict:
    """Queue a fine-tuning job; 422 names a bad spec field, 404 an unknown dataset."""
    with ctx.db.session() as session:
        job = create_job(session, dataset_id=body.dataset_id, spec_payload=body.spec)
    # Enqueued only after the row is committed, so a worker always finds the job.
    try:
        enqueue_finetune(ctx.celery, job.id)
    except Unavailable:
        with ctx.db.session() as session:
            failed = get_job(session, job.id)
            failed.status, failed.finished_at = JobStatus.FAILED, utcnow()
            failed.error = "could not be queued: the job queue (Redis) is unreachable; submit again"
        raise
    with ctx.db.session() as session:
        return job_view(get_job(session, job.id), [])


@router.get("/jobs", response_model=list[JobOut])
def list_all(ctx: Ctx, status: Annotated[JobStatusName | None, Query()] = None,
             limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict]:
    with ctx.db.session() as session:
        return [job_view(job, epoch_rows(session, job.id))
                for job in list_jobs(session, status=status, limit=limit)]


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_one(job_id: str, ctx: Ctx) -> dict:
    """Status, progress and every finished epoch's metrics (they appear while it runs)."""
    with ctx.db.session() as session:
        job = get_job(session, job_id)
        return job_view(job, epoch_rows(session, job_id))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
def cancel(job_id: str, ctx: Ctx) -> JSONResponse | dict:
    """A queued job never starts; a running one stops at the next batch boundary (202)."""
    with ctx.db.session() as session:
        job = cancel_job(session, job_id=job_id)
        view = job_view(job, epoch_rows(session, job_id))
    if view["status"] == JobStatus.RUNNING:
        return JSONResponse(JobOut.model_validate(view).model_dump(mode="json"), status_code=202)
    return view
