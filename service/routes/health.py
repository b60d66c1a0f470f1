from __future__ import annotations

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from ftune.service.db.session import ping
from ftune.service.deps import Ctx
from ftune.service.lifecycle.liveness import live_worker_count

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(ctx: Ctx) -> JSONResponse:
    """200 when the database and Redis answer; 503 naming what is down otherwise. Also says
    whether the blob store answers (checked at most every 10 s; reported, not part of the
    status: with the store down, cached models still serve), whether API keys are required
    (``auth``) and where rate limits and blobs are kept."""
    body: dict = {"status": "ok", "database": "ok", "redis": "ok", "workers": None,
                  "storage": ctx.storage_health.status(),
                  "storage_location": ctx.storage.blobs.location,
                  "auth": ("on: every /v1 route needs an API key" if ctx.settings.auth == "on"
                           else "off: no API keys (allowed on a loopback address only)"),
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
    healthy = body["database"] == "ok" and (ctx.serve_only or body["redis"] == "ok")
    body["status"] = "ok" if healthy else "unavailable"
    return JSONResponse(body, status_code=200 if healthy else 503)
