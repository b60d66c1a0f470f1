"""Refuse state-changing requests that a web page on another site makes a browser send.

Bearer keys already stop blind cross-site requests (a page cannot add the Authorization
header), but with FTUNE_AUTH=off on a laptop, any web page could POST to 127.0.0.1. Browsers
mark such requests with ``Origin`` (and ``Sec-Fetch-Site``), which programs like curl do not
send, so those are refused: a 403 naming the origin.

An origin is a scheme, a host and a port: a page served by another program on the same host
(``http://localhost:9999``) is another origin, and so is ``https`` against ``http``. The
request's own origin is its scheme (``X-Forwarded-Proto`` when uvicorn trusts the proxy) and
its Host header; an origin whose host is another of ``FTUNE_ALLOWED_HOSTS`` (``127.0.0.1`` for
``localhost``) is accepted only with the same scheme and port.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443}


class Origin(NamedTuple):
    scheme: str
    host: str  # lower case; an IPv6 address without its brackets
    port: int | None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}" + (f":{self.port}" if self.port is not None else "")


def parse_origin(url: str) -> Origin | None:
    """``scheme://host[:port]`` with the scheme's default port filled in; None when it is not
    one (``null``, a bad port)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        return None
    scheme = parts.scheme.lower()
    if not parts.hostname or scheme not in DEFAULT_PORTS:
        return None
    return Origin(scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme])


def own_origin(scope: Scope, headers: Headers) -> Origin | None:
    """The origin this request was sent to: its scheme and its Host header (the server's
    address when there is none)."""
    scheme = str(scope.get("scheme", "http"))
    host = headers.get("host")
    if host is None and scope.get("server"):
        server_host, server_port = scope["server"]
        host = f"[{server_host}]:{server_port}" if ":" in server_host else \
            f"{server_host}:{server_port}"
    return parse_origin(f"{scheme}://{host or ''}")


class SameOriginMiddleware:
    def __init__(self, app: ASGIApp, allowed_hosts: list[str]) -> None:
        # Hosts compare without IPv6 brackets, as urlsplit gives them.
        self.app = app
        self.allowed = {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            refusal = self._refusal(scope, Headers(scope=scope))
            if refusal is not None:
                await JSONResponse({"detail": refusal}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope, headers: Headers) -> str | None:
        if headers.get("sec-fetch-site") == "cross-site":
            return "cross-site requests are refused (Sec-Fetch-Site: cross-site)"
        sent = headers.get("origin")
        if sent is None:
            return None
        origin, own = parse_origin(sent), own_origin(scope, headers)
        if origin is not None and own is not None and self._accepted(origin, own):
            return None
        this = f" (this API is {own})" if own is not None else ""
        hint = ("; behind a TLS proxy, start the API with --forwarded-allow-ips so that it "
                "sees https" if origin is not None and own is not None
                and (origin.scheme, own.scheme) == ("https", "http") else "")
        return (f"requests from the web page at {sent[:200]} are refused (another origin)"
                f"{this}{hint}")

    def _accepted(self, origin: Origin, own: Origin) -> bool:
        if origin == own:
            return True
        # Another name of this server (localhost for 127.0.0.1), on the same scheme and port.
        return ("*" not in self.allowed and origin.host in self.allowed
                and (origin.scheme, origin.port) == (own.scheme, own.port))
