"""Hyperparameter sweeps: POST one, follow it (view, SSE, plot), cancel it, promote its best
trial's model."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from ftune.service.auth.principal import Principal
from ftune.service.context import AppContext
from ftune.service.deps import Admin, Ctx, Member, rate_limited
from ftune.service.job_status import SweepStatus
from ftune.service.pages import DEFAULT_LIMIT, Cursor, Limit, Page
from ftune.service.schemas import SweepIn, SweepOut
from ftune.service.sse import SWEEP_STREAM_DOC, event_rows, event_stream
from ftune.service.sweeps.sweeps import (
    cancel_sweep,
    get_sweep,
    list_sweeps,
    promote_sweep,
    submit_sweep,
    sweep_view,
)
from ftune.service.sweeps.trials import load_trials

router = APIRouter(tags=["sweeps"])


class PromoteIn(BaseModel):
    alias: str = Field("best", description="the alias to point at the best trial's model "
                       "(name:alias then refers to it)")


def _view(ctx: AppContext, who: Principal, sweep_id: str) -> dict:
    with ctx.db.session() as session:
        sweep = get_sweep(session, who, sweep_id)
        return sweep_view(sweep, load_trials(session, sweep, with_metrics=False))


@router.post("/sweeps", status_code=202, response_model=SweepOut,
             dependencies=[Depends(rate_limited("jobs"))],
             responses={429: {"description": "over a quota or the running-sweeps limit"}})
def submit(body: SweepIn, request: Request, ctx: Ctx, who: Member,
           idempotency_key: Annotated[str | None, Header()] = None) -> dict:
    """Start a sweep: trials are jobs with ``base`` plus parameters sampled from ``space``,
    at most ``parallelism`` at once. 422 names a bad space path or distribution (every
    sampled spec must validate), 404 an unknown dataset. With an ``Idempotency-Key``
    header, repeating the request returns the same sweep (another body: 409)."""
    sweep_id = submit_sweep(ctx.db, who, ctx.settings, request=body,
                            idempotency_key=idempotency_key, dispatch=ctx.dispatch)
    request.state.audit_object = sweep_id
    return _view(ctx, who, sweep_id)


@router.get("/sweeps", response_model=Page[SweepOut])
def list_all(ctx: Ctx, who: Member, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None
             ) -> dict:
    """Newest first, each with its trials."""
    with ctx.db.session() as session:
        items, next_cursor = list_sweeps(session, who, limit=limit, cursor=cursor)
        return {"items": items, "next_cursor": next_cursor}


@router.get("/sweeps/{sweep_id}", response_model=SweepOut)
def get_one(sweep_id: str, ctx: Ctx, who: Member) -> dict:
    """State, every trial (parameters, status, best objective, epochs reached, pruned or
    not) and the best trial so far."""
    return _view(ctx, who, sweep_id)


@router.get("/sweeps/{sweep_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}},
            description=SWEEP_STREAM_DOC)
async def events(sweep_id: str, request: Request, ctx: Ctx, who: Member,
                 last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
    """The sweep's events as Server-Sent Events (described by ``SWEEP_STREAM_DOC``)."""

    def poll(after_id: int) -> tuple[bool, list]:
        with ctx.db.session() as session:
            ended = get_sweep(session, who, sweep_id).status != SweepStatus.RUNNING
            return ended, event_rows(session, sweep_id, after_id)

    return await event_stream(request, ctx, who, sweep_id, poll, last_event_id)


@router.get("/sweeps/{sweep_id}/plot.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def plot(sweep_id: str, ctx: Ctx, who: Member) -> Response:
    """The objective per trial over time with the best so far, and the objective against
    the parameters that move it most."""
    from ftune.service.sweeps.plot import sweep_png

    with ctx.db.session() as session:
        sweep = get_sweep(session, who, sweep_id)
        trials = load_trials(session, sweep, with_metrics=False)
        view = sweep_view(sweep, trials)
        now = time.time()
        finished = {t.row.number: ((t.job.finished_at.timestamp() if t.job.finished_at
                                    else now) - sweep.created_at.timestamp())
                    for t in trials}
    return Response(sweep_png(view, finished), media_type="image/png",
                    headers={"Cache-Control": "no-cache"})


@router.post("/sweeps/{sweep_id}/cancel", response_model=SweepOut)
def cancel(sweep_id: str, ctx: Ctx, who: Member) -> dict:
    """No more trials start; waiting ones are cancelled, running ones stop at their next
    batch. 409 when the sweep has already ended."""
    with ctx.db.session() as session:
        cancel_sweep(session, who, sweep_id=sweep_id)
    return _view(ctx, who, sweep_id)


@router.post("/sweeps/{sweep_id}/promote")
def promote(sweep_id: str, body: PromoteIn, ctx: Ctx, who: Admin) -> dict:
    """Admins only (as for any alias): point ``alias`` at the best trial's model; returns
    ``{"alias": "name:alias", "model_id", "trial"}``. 409 before a trial has a model."""
    with ctx.db.session() as session:
        return promote_sweep(session, who, sweep_id=sweep_id, alias=body.alias)
