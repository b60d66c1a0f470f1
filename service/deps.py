"""Dependencies that routes declare: the per-process context, who the caller is (every /v1
route authenticates), the role a route needs, and rate limits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from ftune.service.auth.keys import KEY_PREFIX, looks_like_key
from ftune.service.auth.principal import LOCAL_USER, Principal, Role
from ftune.service.context import AppContext
from ftune.service.errors import Unauthorized


def get_context(request: Request) -> AppContext:
    return request.app.state.ctx


Ctx = Annotated[AppContext, Depends(get_context)]

# Adds the "Authorize" button and the security scheme to the OpenAPI document.
bearer = HTTPBearer(auto_error=False, scheme_name="APIKey",
                    description=f"An API key: `Authorization: Bearer {KEY_PREFIX}…`")


async def authenticate(ctx: AppContext, token: str | None) -> Principal:
    """The principal a bearer token stands for; 401 for a missing, unknown, revoked or
    expired key. A cached lookup costs a SHA-256 and a dict lookup (no I/O)."""
    if ctx.settings.auth == "off":
        return LOCAL_USER
    if not token:
        raise Unauthorized(f"missing API key: send `Authorization: Bearer {KEY_PREFIX}…`")
    if not looks_like_key(token):
        raise Unauthorized("unknown API key")
    digest, lookup = ctx.keys.cached(token)
    if lookup is None:
        lookup = await run_in_threadpool(ctx.keys.load, digest)
    if lookup.principal is None:
        raise Unauthorized(lookup.reason)
    key_id = lookup.principal.key_id
    if key_id is not None and ctx.keys.due_for_touch(key_id):
        # "Last used" is bookkeeping: written off the request path.
        asyncio.get_running_loop().run_in_executor(None, ctx.keys.touch, key_id)
    return lookup.principal


async def principal(request: Request, ctx: Ctx,
                    credentials: Annotated[HTTPAuthorizationCredentials | None,
                                           Depends(bearer)]) -> Principal:
    who = await authenticate(ctx, credentials.credentials if credentials else None)
    request.state.principal = who  # for the audit log
    return who


def requires(role: Role, what: str) -> Callable[..., Awaitable[Principal]]:
    async def check(who: Annotated[Principal, Depends(principal)]) -> Principal:
        who.require(role, what)
        return who

    return check


Member = Annotated[Principal, Depends(principal)]
Admin = Annotated[Principal, Depends(requires(Role.ADMIN, "this route"))]
Operator = Annotated[Principal, Depends(requires(Role.OPERATOR, "this route"))]


def rate_limited(category: str) -> Callable[..., Awaitable[None]]:
    async def hit(ctx: Ctx, who: Member) -> None:
        await run_in_threadpool(ctx.limiter.hit, category, who.key_id or "local")

    return hit
