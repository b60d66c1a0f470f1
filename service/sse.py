"""Server-Sent Events for a job or a sweep: the rows of ``job_events`` under its id, from
``Last-Event-ID`` on, until it ends or the caller's key stops working. Ids count 1, 2, 3 ...
within the job or sweep (``job_events.seq``). Each row's kind is
the ``event:`` field; the kinds each stream carries are ``JOB_EVENTS`` and ``SWEEP_EVENTS``
in ``service/events.py``, and the routes' OpenAPI texts below are made from them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import weakref
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ftune.service.auth.principal import Principal
from ftune.service.context import AppContext
from ftune.service.deps import authenticate
from ftune.service.errors import InvalidInput, Unauthorized
from ftune.service.events import (
    JOB_EVENTS,
    SWEEP_EVENTS,
    describe_kinds,
    events_after,
    resume_point,
)
from ftune.service.streams import RECHECK_S, SAFETY_READ_S

SSE_KEEPALIVE_S = 15.0

# The OpenAPI descriptions of GET /v1/jobs/{id}/events and GET /v1/sweeps/{id}/events.
_RECONNECT = "reconnect with ``Last-Event-ID`` to continue where it stopped."
JOB_STREAM_DOC = (f"Server-Sent Events: {describe_kinds(JOB_EVENTS)}. Ends when the job ends, "
                  f"or when the key stops working (revoked, expired); {_RECONNECT}")
SWEEP_STREAM_DOC = (f"Server-Sent Events: {describe_kinds(SWEEP_EVENTS)}. Ends with the sweep, "
                    f"or when the key stops working; {_RECONNECT}")

# after_id -> (whether the subject has ended, its events after that id)
Poll = Callable[[int], tuple[bool, list]]


def event_rows(session: Session, subject_id: str, after_id: int) -> list:
    """(id, kind, data) of the subject's events after ``after_id``; an id is the event's
    number within its job or sweep (1, 2, 3 ...), never a count across tenants."""
    return [(e.seq, e.kind, {**e.data, "at": e.created_at.isoformat()})
            for e in events_after(session, subject_id, after_id)]


def _resume_point(ctx: AppContext, subject_id: str, after: int) -> int:
    with ctx.db.session() as session:
        return resume_point(session, subject_id, after)


async def event_stream(request: Request, ctx: AppContext, who: Principal, subject_id: str,
                       poll: Poll, last_event_id: str | None) -> StreamingResponse:
    raw = (last_event_id or request.query_params.get("last_event_id") or "0").strip()
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise InvalidInput("Last-Event-ID must be an event id (a non-negative integer)")
    token = _bearer_token(request)
    await run_in_threadpool(poll, int(raw))  # 404 before the stream starts
    after = await run_in_threadpool(_resume_point, ctx, subject_id, int(raw))
    # 429/503 before the stream starts
    release = ctx.streams.admit(who.key_id or "local", tenant_id=who.home_tenant)

    async def stream() -> AsyncIterator[str]:
        last, quiet_since, read_at = after, time.monotonic(), -math.inf
        try:
            yield "retry: 2000\n\n"
            with ctx.streams.watching(subject_id) as woken:
                while True:
                    try:
                        await authenticate(ctx, token)  # a revoked key ends the stream
                    except Unauthorized as exc:
                        yield f"event: error\ndata: {json.dumps({'detail': exc.detail})}\n\n"
                        return
                    if woken.is_set() or time.monotonic() - read_at > SAFETY_READ_S:
                        woken.clear()
                        read_at = time.monotonic()
                        ended, rows = await run_in_threadpool(poll, last)
                        for event_id, kind, data in rows:
                            yield (f"id: {event_id}\nevent: {kind}\n"
                                   f"data: {json.dumps(data, default=str)}\n\n")
                            last, quiet_since = event_id, time.monotonic()
                        if ended and not rows:
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
