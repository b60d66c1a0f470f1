from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from ftune.service.deps import Ctx, Operator

router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(ctx: Ctx, _: Operator) -> Response:
    """Prometheus metrics (operators only: ``Authorization: Bearer`` an operator key, which
    Prometheus sends with ``authorization: {credentials_file: ...}``). See README,
    "Operating ftune"."""
    body = await run_in_threadpool(ctx.metrics.render)  # reads the database and Redis
    return Response(body, media_type=CONTENT_TYPE_LATEST)
