"""The FastAPI application: routes are thin, logic lives in the service modules."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ftune.models.settings import SettingsError
from ftune.service.audit import AuditMiddleware
from ftune.service.body_limits import BodyLimitsMiddleware
from ftune.service.context import AppContext
from ftune.service.dashboard import routes as dashboard
from ftune.service.deps import principal
from ftune.service.errors import install_error_handlers
from ftune.service.freed_memory import return_freed_memory_forever
from ftune.service.lifecycle.reconciler import reconcile
from ftune.service.origin import SameOriginMiddleware
from ftune.service.request_timing import RequestTimingMiddleware
from ftune.service.routes import (
    api_docs,
    audit,
    backbones,
    datasets,
    health,
    jobs,
    keys,
    metrics,
    sweeps,
    tenants,
    tuned_models,
)
from ftune.service.settings import Settings

log = logging.getLogger(__name__)

TRAINING_ROUTES = (backbones, datasets, jobs, sweeps, tuned_models, keys, tenants, audit)


async def _maintain_forever(ctx: AppContext) -> None:
    """Admit waiting jobs every FTUNE_DISPATCH_INTERVAL_S; repair lost and abandoned jobs,
    and retry the store deletes that failed, every FTUNE_RECONCILE_INTERVAL_S."""
    next_repair = 0.0
    while True:
        try:
            if time.monotonic() >= next_repair:
                next_repair = time.monotonic() + ctx.settings.reconcile_interval_s
                await run_in_threadpool(reconcile, ctx.db, ctx.celery, ctx.redis,
                                        ctx.settings)
                await run_in_threadpool(ctx.remove_objects)
            await run_in_threadpool(ctx.dispatch)
        except Exception as exc:  # Redis or the DB down: try again next round
            log.warning("job upkeep skipped a round: %s", exc)
        await asyncio.sleep(ctx.settings.dispatch_interval_s)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(settings: Settings | None = None, *, serve_only: bool = False) -> FastAPI:
    """The full API, or with ``serve_only`` the predict-side routes alone (``ftune serve``):
    no job queue, no Redis, scaled apart from the training API."""
    settings = settings or Settings()
    if settings.auth == "off" and not is_loopback(settings.api_host):
        raise SettingsError(f"FTUNE_AUTH=off is allowed only when the API listens on a loopback "
                            f"address, not {settings.api_host}; create keys instead "
                            "(`ftune keys create`)")
    ctx = AppContext.build(settings, serve_only=serve_only)
    # Anything a library spools to a temp file stays inside the data directory.
    tempfile.tempdir = str(ctx.storage.tmp)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(return_freed_memory_forever())]
        if not serve_only:
            tasks += [asyncio.create_task(_maintain_forever(ctx)),
                      asyncio.create_task(ctx.streams.run())]
        yield
        for task in tasks:
            task.cancel()
        ctx.db.dispose()

    # docs_url/redoc_url off: FastAPI's pages load their scripts from a CDN (blank offline);
    # api_docs serves Swagger UI's files itself.
    app = FastAPI(title="ftune", version="0.1.0", lifespan=lifespan, docs_url=None,
                  redoc_url=None,
                  description="Fine-tune ImageNet-pretrained backbones on your images. Every "
                  "/v1 route needs an API key: `Authorization: Bearer ftk_…` (the Authorize "
                  "button).")
    app.state.ctx = ctx
    install_error_handlers(app)
    # Outermost last: the host check first, then body limits, same-origin, the audit log.
    app.add_middleware(RequestTimingMiddleware, histogram=ctx.metrics.request_seconds)
    app.add_middleware(AuditMiddleware, db=ctx.db)
    app.add_middleware(SameOriginMiddleware, allowed_hosts=settings.host_patterns)
    app.add_middleware(BodyLimitsMiddleware, idle_timeout_s=settings.upload_idle_timeout_s)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.host_patterns)
    app.include_router(health.router)
    app.include_router(api_docs.router)  # /docs and /favicon.ico: files only, no data
    if not serve_only:
        app.include_router(dashboard.router)  # the pages hold no data: the key is the user's
    app.include_router(metrics.router, dependencies=[Depends(principal)])
    for module in ((tuned_models,) if serve_only else TRAINING_ROUTES):
        # Every /v1 route authenticates, whether or not it reads the principal itself.
        app.include_router(module.router, prefix="/v1", dependencies=[Depends(principal)])
    return app
