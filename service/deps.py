"""Dependencies that routes declare: the per-process context (settings, DB, storage, models)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ftune.service.context import AppContext


def get_context(request: Request) -> AppContext:
    return request.app.state.ctx


Ctx = Annotated[AppContext, Depends(get_context)]
