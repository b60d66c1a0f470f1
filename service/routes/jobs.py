from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, StreamingResponse

from ftune.service.auth.principal import Principal
from ftune.service.context import AppContext
from ftune.service.deps import Admin, Ctx, Member, rate_limited
from ftune.service.disk import disk_allowance
from ftune.service.job_status import TERMINAL, JobStatus
from ftune.service.jobs import (
    cancel_job,
    delete_job,
    epoch_rows,
    get_job,
    job_view,
    list_jobs,
    queue_position,
    submit_job,
)
from ftune.service.logs import MAX_TAIL, read_job_log, stored_log_lines
from ftune.service.pages import DEFAULT_LIMIT, Cursor, Limit, Page
from ftune.service.schemas import JobIn, JobOut, JobSummary
from ftune.service.sse import JOB_STREAM_DOC, event_rows, event_stream

router = APIRouter(tags=["jobs"])


def _view(ctx: AppContext, who: Principal, job_id: str) -> dict:
    with ctx.db.session() as session:
        job = get_job(session, who, job_id)
        return job_view(job, epoch_rows(session, job_id), queue_position(session, job))


@router.post("/jobs", status_code=202, response_model=JobOut,
             dependencies=[Depends(rate_limited("jobs"))],
             responses={429: {"description": "over a quota or the submission rate limit"},
                        503: {"description": "the job queue (Redis) is unreachable"}})
def submit(body: JobIn, request: Request, ctx: Ctx, who: Member,
           idempotency_key: Annotated[str | None, Header()] = None) -> dict:
    """Queue a fine-tuning job; 422 names a bad spec field, 404 an unknown dataset, 429 a
    quota. Priorities above 5 need an admin key.

    With an ``Idempotency-Key`` header, repeating the request returns the same job; the same
    key with another body is a 409. 507 when the data disk is down to its reserve (a job
    writes checkpoints and a model)."""
    disk_allowance(ctx.storage, ctx.settings, "a new job")
    job_id = submit_job(ctx.db, who, ctx.settings, request=body,
                        idempotency_key=idempotency_key, dispatch=ctx.dispatch)
    request.state.audit_object = job_id
    return _view(ctx, who, job_id)


@router.get("/jobs", response_model=Page[JobSummary])
def list_all(ctx: Ctx, who: Member, status: Annotated[JobStatus | None, Query()] = None,
             limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None) -> dict:
    """Newest first; per-epoch metrics are in each job's own GET."""
    with ctx.db.session() as session:
        items, next_cursor = list_jobs(session, who, status=status, limit=limit, cursor=cursor)
        return {"items": items, "next_cursor": next_cursor}


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_one(job_id: str, ctx: Ctx, who: Member) -> dict:
    """Status, progress, queue position (or why it is held back) and every finished epoch's
    metrics (while it runs)."""
    return _view(ctx, who, job_id)


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
def cancel(job_id: str, ctx: Ctx, who: Member) -> JSONResponse | dict:
    """A waiting job never starts; a running one stops at the next batch boundary (202)."""
    with ctx.db.session() as session:
        cancel_job(session, who, job_id=job_id)
    view = _view(ctx, who, job_id)
    if view["status"] == JobStatus.RUNNING:
        return JSONResponse(jsonable_encoder(JobOut.model_validate(view)), status_code=202)
    return view


@router.delete("/jobs/{job_id}", status_code=204)
def delete_one(job_id: str, ctx: Ctx, who: Admin) -> Response:
    """Admins only: a finished job with its metrics, events and files (409 while it is active,
    or while the model it made exists)."""
    with ctx.db.session() as session:
        doomed = delete_job(session, who, job_id=job_id)
    ctx.remove_deleted(doomed)
    return Response(status_code=204)


@router.get("/jobs/{job_id}/logs")
def logs(job_id: str, ctx: Ctx, who: Admin,
         tail: Annotated[int, Query(ge=1, le=MAX_TAIL)] = 1000) -> dict:
    """Admins only: the last ``tail`` lines the job's workers logged while running it (every
    attempt), as ``{"lines": [{"ts", "level", "logger", "message", "job_id", "tenant"}]}``;
    server paths are redacted."""
    with ctx.db.session() as session:
        get_job(session, who, job_id)
    lines = read_job_log(stored_log_lines(ctx.storage.blobs, job_id), ctx.storage.home, tail)
    return {"lines": lines}


@router.get("/jobs/{job_id}/curves.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def curves(job_id: str, ctx: Ctx, who: Member) -> Response:
    """Loss and accuracy against epoch, train and val; available while the job runs."""
    from ftune.service.plots import curves_png

    with ctx.db.session() as session:
        get_job(session, who, job_id)
        rows = epoch_rows(session, job_id)
    return Response(curves_png(rows, f"job {job_id[:8]}"), media_type="image/png",
                    headers={"Cache-Control": "no-cache"})


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}}, description=JOB_STREAM_DOC)
async def events(job_id: str, request: Request, ctx: Ctx, who: Member,
                 last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
    """The job's events as Server-Sent Events (described by ``JOB_STREAM_DOC``)."""

    def poll(after_id: int) -> tuple[bool, list]:
        with ctx.db.session() as session:
            status = get_job(session, who, job_id).status  # read first: its events are then in
            return status in TERMINAL, event_rows(session, job_id, after_id)

    return await event_stream(request, ctx, who, job_id, poll, last_event_id)
