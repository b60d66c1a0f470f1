"""The FastAPI application: routes are thin, logic lives in the service modules."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from ftune.service.context import AppContext
from ftune.service.errors import install_error_handlers
from ftune.service.lifecycle.reconciler import reconcile
from ftune.service.routes import backbones, datasets, health, jobs, tuned_models
from ftune.service.settings import Settings

log = logging.getLogger(__name__)


async def _reconcile_forever(ctx: AppContext) -> None:
    """Repair lost and abandoned jobs now and every FTUNE_RECONCILE_INTERVAL_S."""
    while True:
        try:
            await run_in_threadpool(reconcile, ctx.db, ctx.celery, ctx.redis, ctx.settings,
                                    ctx.storage)
        except Exception as exc:  # Redis or the DB down: try again next round
            log.warning("reconciler skipped a round: %s", exc)
        await asyncio.sleep(ctx.settings.reconcile_interval_s)


def create_app(settings: Settings | None = None, *, serve_only: bool = False) -> FastAPI:
    """The full API, or with ``serve_only`` the predict-side routes alone (``ftune serve``):
    no job queue, no Redis, scaled apart from the training API."""
    settings = settings or Settings()
    ctx = AppContext.build(settings, serve_only=serve_only)
    # Anything a library spools to a temp file stays inside the data directory.
    tempfile.tempdir = str(ctx.storage.tmp)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        repairing = None if serve_only else asyncio.create_task(_reconcile_forever(ctx))
        yield
        if repairing is not None:
            repairing.cancel()
        ctx.db.dispose()

    app = FastAPI(title="ftune", version="0.1.0", lifespan=lifespan,
                  description="Fine-tune ImageNet-pretrained backbones on your images.")
    app.state.ctx = ctx
    install_error_handlers(app)
    app.include_router(health.router)
    for module in ((tuned_models,) if serve_only else (backbones, datasets, jobs, tuned_models)):
        app.include_router(module.router, prefix="/v1")
    return app
