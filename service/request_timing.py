"""Times uploads and predictions for /metrics: from the request's arrival to the end of its
response, whatever the outcome (a refused upload is part of what clients wait on)."""

from __future__ import annotations

import re
import time

from prometheus_client import Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TIMED = (("POST", re.compile(r"^/v1/datasets/?$"), "upload"),
         ("POST", re.compile(r"^/v1/models/[^/]+/predict/?$"), "predict"))


def timed_route(method: str, path: str) -> str | None:
    for want, pattern, name in TIMED:
        if method == want and pattern.match(path):
            return name
    return None


class RequestTimingMiddleware:
    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app, self.histogram = app, histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = timed_route(scope.get("method", ""), scope.get("path", "")) \
            if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.histogram.labels(route).observe(time.perf_counter() - started)

        await self.app(scope, receive, timed_send)
