"""Refuse state-changing requests that a web page on another site makes a browser send.

Bearer keys already stop blind cross-site requests (a page cannot add the Authorization
header), but with FTUNE_AUTH=off on a laptop, any web page could POST to 127.0.0.1. Browsers
mark such requests with ``Origin`` (and ``Sec-Fetch-Site``), which programs like curl do not
send, so those are refused: a 403 naming the origin.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class SameOriginMiddleware:
    def __init__(self, app: ASGIApp, allowed_hosts: list[str]) -> None:
        self.app, self.allowed = app, {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            refusal = self._refusal(Headers(scope=scope))
            if refusal is not None:
                await JSONResponse({"detail": refusal}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, headers: Headers) -> str | None:
        if headers.get("sec-fetch-site") == "cross-site":
            return "cross-site requests are refused (Sec-Fetch-Site: cross-site)"
        origin = headers.get("origin")
        if origin is None:
            return None
        origin_host = (urlsplit(origin).hostname or "").lower()
        own_host = (urlsplit(f"//{headers.get('host', '')}").hostname or "").lower()
        if origin_host == own_host or ("*" not in self.allowed and origin_host in self.allowed):
            return None
        return f"requests from the web page at {origin} are refused (another origin)"
