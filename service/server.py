"""Run the API under uvicorn with limits on what each connection may hold.

Requests are parsed by httptools (llhttp, in C): uvicorn's pure-Python h11 parser cost a
small request about a millisecond of the event loop's one thread. Uvicorn times out idle
keep-alive connections but not a client that opens a connection and sends its headers a byte
at a time (slowloris): ``HeaderTimeoutProtocol`` closes a connection whose request headers
are not complete ``FTUNE_HEADER_TIMEOUT_S`` after it opened or after its previous response.
Bodies are bounded by ``body_limits``; connections and requests at once by
``FTUNE_LIMIT_CONCURRENCY`` (uvicorn answers 503 beyond it).
"""

from __future__ import annotations

import asyncio
import logging
import math

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ftune.service.logs import use_log_format
from ftune.service.settings import Settings


class HeaderTimeoutProtocol(HttpToolsProtocol):
    header_timeout_s = 10.0  # set by ``serve`` for the process
    _header_timer: asyncio.TimerHandle | None = None

    # As uvicorn's own override: asyncio.Protocol declares the wider BaseTransport.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()  # the request line and headers are in
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Wait for the next request's headers, unless they are in already (a pipelined
        # request just started, or one read while this response was being sent).
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and not self.pipeline and not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def serve(app: FastAPI, settings: Settings, *, port: int, forwarded_allow_ips: str | None,
          log_level: str) -> None:
    HeaderTimeoutProtocol.header_timeout_s = settings.header_timeout_s
    config = uvicorn.Config(
        app, host=settings.api_host, port=port, http=HeaderTimeoutProtocol,
        proxy_headers=True, forwarded_allow_ips=forwarded_allow_ips,
        limit_concurrency=settings.limit_concurrency,
        timeout_keep_alive=max(1, math.ceil(settings.keep_alive_s)),
        log_level=log_level)
    # uvicorn set up its own loggers just now: give them (and the root) the chosen format.
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        use_log_format(settings.log_format, logging.getLogger(name))
    uvicorn.Server(config).run()
