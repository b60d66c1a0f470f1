"""Dependencies that routes declare: the per-process context, who the caller is (every /v1
route authenticates), the role a route needs, and rate limits."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from ftune.service.auth.keys import KEY_PREFIX, looks_like_key
from ftune.service.auth.principal import LOCAL_USER, Principal, Role
from ftune.service.context import AppContext
from ftune.service.errors import Unauthorized


async def get_context(request: Request) -> AppContext:
    # async: FastAPI runs a plain function dependency on a worker thread, a hop per request.
    return request.app.state.ctx


Ctx = Annotated[AppContext, Depends(get_context)]

# Adds the "Authorize" button and the security scheme to the OpenAPI document.
bearer = HTTPBearer(auto_error=False, scheme_name="APIKey",
                    description=f"An API key: `Authorization: Bearer {KEY_PREFIX}…`")


BEARER_HEADER = f"`Authorization: Bearer {KEY_PREFIX}…`"
# Where people put keys for other APIs: named in the 401 so the fix is plain.
OTHER_KEY_HEADERS = ("X-API-Key", "Api-Key", "X-Auth-Token")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,19}")  # shown back; anything else is not


def missing_key(request: Request) -> str:
    """Why the request carries no bearer key, from what it sent instead (never echoing a
    key): the header without a scheme, another scheme, or another header."""
    sent = request.headers.get("Authorization", "").strip()
    if sent:
        scheme, _, rest = sent.partition(" ")
        if scheme.lower() == "bearer":
            return f"the Authorization header has no key after Bearer: send {BEARER_HEADER}"
        if not rest.strip() or scheme.startswith(KEY_PREFIX):
            return (f"the Authorization header has no scheme: send {BEARER_HEADER} (the word "
                    "Bearer, a space, then the key)")
        named = repr(scheme) if _SCHEME.fullmatch(scheme) else "not Bearer"
        return f"the Authorization header's scheme is {named}: send {BEARER_HEADER}"
    for name in OTHER_KEY_HEADERS:
        if name in request.headers:
            return f"API keys are not read from {name}: send {BEARER_HEADER}"
    return f"missing API key: send {BEARER_HEADER}"


async def authenticate(ctx: AppContext, token: str | None,
                       missing: str = f"missing API key: send {BEARER_HEADER}") -> Principal:
    """The principal a bearer token stands for; 401 for a missing, unknown, revoked or
    expired key (``missing``: what to say when there is none). A cached lookup costs a
    SHA-256 and a dict lookup (no I/O)."""
    if ctx.settings.auth == "off":
        return LOCAL_USER
    if not token:
        raise Unauthorized(missing)
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
    token = credentials.credentials if credentials else None
    who = await authenticate(ctx, token, missing_key(request) if token is None else "")
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
        if ctx.limiter.in_memory:  # no I/O (ftune serve): a thread hop would cost more
            ctx.limiter.hit(category, who.key_id or "local")
        else:
            await run_in_threadpool(ctx.limiter.hit, category, who.key_id or "local")

    return hit
