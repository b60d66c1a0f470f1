from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import weakref
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ftune.service.auth.principal import Principal
from ftune.service.context import AppContext
from ftune.service.deps import Admin, Ctx, Member, authenticate, rate_limited
from ftune.service.disk import disk_allowance
from ftune.service.errors import InvalidInput, Unauthorized
from ftune.service.events import events_after
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
from ftune.service.logs import MAX_TAIL, read_job_log
from ftune.service.pages import DEFAULT_LIMIT, Cursor, Limit, Page
from ftune.service.schemas import JobIn, JobOut, JobSummary
from ftune.service.streams import RECHECK_S, SAFETY_READ_S

router = APIRouter(tags=["jobs"])
SSE_KEEPALIVE_S = 15.0


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
        delete_job(session, who, job_id=job_id)
    ctx.storage.remove_job_files(job_id)
    return Response(status_code=204)


@router.get("/jobs/{job_id}/logs")
def logs(job_id: str, ctx: Ctx, who: Admin,
         tail: Annotated[int, Query(ge=1, le=MAX_TAIL)] = 1000) -> dict:
    """Admins only: the last ``tail`` lines the job's workers logged while running it (every
    attempt), as ``{"lines": [{"ts", "level", "logger", "message", "job_id", "tenant"}]}``;
    server paths are redacted."""
    with ctx.db.session() as session:
        get_job(session, who, job_id)
    lines = read_job_log(ctx.storage.job_log(job_id), ctx.storage.home, tail)
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
            responses={200: {"content": {"text/event-stream": {}}}})
async def events(job_id: str, request: Request, ctx: Ctx, who: Member,
                 last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
    """Server-Sent Events: ``status``, ``epoch`` (each epoch's metrics), ``progress`` (batches,
    every few seconds) and ``note``. Ends when the job ends, or when the key stops working
    (revoked, expired); reconnect with ``Last-Event-ID`` to continue where it stopped."""
    raw = (last_event_id or request.query_params.get("last_event_id") or "0").strip()
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise InvalidInput("Last-Event-ID must be an event id (a non-negative integer)")
    after = int(raw)
    token = _bearer_token(request)

    def poll(after_id: int) -> tuple[str, list]:
        with ctx.db.session() as session:
            status = get_job(session, who, job_id).status  # read first: its events are then in
            return status, [(e.id, e.kind, {**e.data, "at": e.created_at.isoformat()})
                            for e in events_after(session, job_id, after_id)]

    await run_in_threadpool(poll, after)  # 404 before the stream starts
    release = ctx.streams.admit(who.key_id or "local")  # 429/503 before the stream starts

    async def stream() -> AsyncIterator[str]:
        last, quiet_since, read_at = after, time.monotonic(), -math.inf
        try:
            yield "retry: 2000\n\n"
            with ctx.streams.watching(job_id) as woken:
                while True:
                    try:
                        await authenticate(ctx, token)  # a revoked key ends the stream
                    except Unauthorized as exc:
                        yield f"event: error\ndata: {json.dumps({'detail': exc.detail})}\n\n"
                        return
                    if woken.is_set() or time.monotonic() - read_at > SAFETY_READ_S:
                        woken.clear()
                        read_at = time.monotonic()
                        status, rows = await run_in_threadpool(poll, last)
                        for event_id, kind, data in rows:
                            yield (f"id: {event_id}\nevent: {kind}\n"
                                   f"data: {json.dumps(data, default=str)}\n\n")
                            last, quiet_since = event_id, time.monotonic()
                        if status in TERMINAL and not rows:
                            return
                    if await request.is_disconnected():
                        return
                    if time.monotonic() - quiet_since > SSE_KEEPALIVE_S:
                        yield ": keep-alive\n\n"
                        quiet_since = time.monotonic()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(RECHECK_S):
                            await woken.wait()
        finally:
            release()

    body = stream()
    weakref.finalize(body, release)  # also when the stream is dropped before its first read
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None
