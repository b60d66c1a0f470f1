"""Limits on request bodies, for every route: how long a client may pause mid-body, and how
large a body that is not an upload may be.

Uvicorn reads a body only as fast as the client sends it and never times a pause out, so a
client sending a byte a minute (slowloris) would hold a connection, a task and, for uploads, a
partial file forever. Here every wait for the next piece of a body is bounded: a client idle
for ``idle_timeout_s`` gets 408 and the connection is closed; the upload code removes what it
had written, as on any error. Bodies other than multipart uploads (JSON) are small by nature
and are read whole into memory, so they are capped at ``MAX_SMALL_BODY_BYTES``.

Errors are raised from ``receive`` as HTTP exceptions, which both FastAPI's body parsing and
our multipart reader pass through unchanged.
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_SMALL_BODY_BYTES = 1 << 20  # a job spec is a few kB


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"request body larger than {limit} bytes; only uploads "
                         "(multipart/form-data) may be larger")


class BodyLimitsMiddleware:
    def __init__(self, app: ASGIApp, idle_timeout_s: float,
                 max_small_body: int = MAX_SMALL_BODY_BYTES) -> None:
        self.app, self.idle_timeout_s, self.max_small_body = app, idle_timeout_s, max_small_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        is_upload = headers.get("content-type", "").startswith("multipart/form-data")
        limit = None if is_upload else self.max_small_body
        declared = headers.get("content-length", "")
        if limit is not None and declared.isdigit() and int(declared) > limit:
            error = _too_large(limit)
            await JSONResponse({"detail": error.detail}, status_code=error.status_code,
                               headers={"Connection": "close"})(scope, receive, send)
            return
        await self.app(scope, _BoundedReceive(receive, self.idle_timeout_s, limit), send)


class _BoundedReceive:
    """``receive`` with a timeout while the body is still arriving, and a size cap."""

    def __init__(self, receive: Receive, idle_timeout_s: float, limit: int | None) -> None:
        self.receive, self.idle_timeout_s, self.limit = receive, idle_timeout_s, limit
        self.received = 0
        self.body_done = False

    async def __call__(self) -> Message:
        if self.body_done:  # afterwards receive only waits for the client to disconnect
            return await self.receive()
        try:
            async with asyncio.timeout(self.idle_timeout_s):
                message = await self.receive()
        except TimeoutError:
            raise HTTPException(408, f"the request body stalled: nothing arrived for "
                                f"{self.idle_timeout_s:g} s (FTUNE_UPLOAD_IDLE_TIMEOUT_S)",
                                headers={"Connection": "close"}) from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.limit is not None and self.received > self.limit:
                raise _too_large(self.limit)
            self.body_done = not message.get("more_body", False)
        else:
            self.body_done = True
        return message
