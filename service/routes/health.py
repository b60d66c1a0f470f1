from __future__ import annotations

from typing import Annotated

import redis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy.exc import SQLAlchemyError

from ftune.service.auth.principal import Principal
from ftune.service.context import AppContext
from ftune.service.db.session import ping
from ftune.service.deps import Ctx, authenticate, bearer
from ftune.service.errors import Unavailable
from ftune.service.lifecycle.liveness import live_worker_count

router = APIRouter(tags=["health"])


async def _caller(ctx: Ctx, credentials: Annotated[HTTPAuthorizationCredentials | None,
                                                     Depends(bearer)]) -> Principal | None:
    """Who asks, when a key is sent (a bad one is a 401); None for a load balancer's bare
    probe. With FTUNE_AUTH=off everyone is the local operator."""
    if credentials is None and ctx.settings.auth == "on":
        return None
    try:
        return await authenticate(ctx, credentials.credentials if credentials else None)
    except (Unavailable, SQLAlchemyError):
        return None  # the key cannot be checked (the database is down): the bare answer


@router.get("/healthz")
def healthz(request: Request, ctx: Ctx,
            caller: Annotated[Principal | None, Depends(_caller)]) -> JSONResponse:
    """200 when the database and Redis answer; 503 otherwise. Without a key, only that
    (``status``), the mode (``mode``: api or serve; ``auth``: whether API keys are required)
    and ``version``. With a valid key, also what is down, whether the blob store answers
    (checked at most every 10 s; reported, not part of the status: with the store down,
    cached models still serve), live workers, where rate limits and blobs are kept, and the
    loaded models' counters."""
    details = _details(ctx)
    healthy = details["database"] == "ok" and (ctx.serve_only or details["redis"] == "ok")
    body: dict = {"status": "ok" if healthy else "unavailable",
                  "mode": "serve" if ctx.serve_only else "api",
                  "auth": ("on: every /v1 route needs an API key" if ctx.settings.auth == "on"
                           else "off: no API keys (allowed on a loopback address only)"),
                  "version": request.app.version}
    if caller is not None:  # component states and counters are for key holders only
        body.update(details)
    return JSONResponse(body, status_code=200 if healthy else 503)


def _details(ctx: AppContext) -> dict:
    """The state of each component and the prediction counters."""
    body: dict = {"database": "ok", "redis": "ok", "workers": None,
                  "storage": ctx.storage_health.status(),
                  "storage_location": ctx.storage.blobs.location,
                  "rate_limits": ctx.limiter.where,
                  "loaded_models": len(ctx.predictors), "model_loads": ctx.predictors.loads,
                  "predict_batches": ctx.predictors.batches,
                  "predict_images": ctx.predictors.images}
    try:
        ping(ctx.db.engine)
    except SQLAlchemyError as exc:
        body["database"] = f"down: {type(exc).__name__}"
    if ctx.serve_only:
        body["redis"] = "not used (ftune serve)"
    else:
        try:
            ctx.redis.ping()
            body["workers"] = live_worker_count(ctx.redis)
        except (redis.RedisError, RuntimeError) as exc:
            body["redis"] = f"down: {exc}"
    return body
