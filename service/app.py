"""The FastAPI application: routes are thin, logic lives in the service modules."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.context import AppContext
from service.errors import install_error_handlers
from service.routes import backbones, datasets, health, jobs, tuned_models
from service.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    ctx = AppContext.build(settings)
    # Anything a library spools to a temp file stays inside the data directory.
    tempfile.tempdir = str(ctx.storage.tmp)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        ctx.db.dispose()

    app = FastAPI(title="ftune", version="0.1.0", lifespan=lifespan,
                  description="Fine-tune ImageNet-pretrained backbones on your images.")
    app.state.ctx = ctx
    install_error_handlers(app)
    app.include_router(health.router)
    for module in (backbones, datasets, jobs, tuned_models):
        app.include_router(module.router, prefix="/v1")
    return app
