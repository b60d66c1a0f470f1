"""An HTTP client that records every request in the journal and judges its answer: no 5xx
except a 503 with Retry-After during a fault or from a declared capacity (or a 507 while the
disk is below the API's reserve: the fault's ballast, or anything else that filled it), and no
request left unanswered except while the API restarts."""

from __future__ import annotations

import time
from typing import Any

import httpx

from ftune.testing.soak.journal import Call, Journal

TIMEOUT_S = 90.0  # longer than any fault holds a request (SQLite's lock waits it out)
# An idle connection is dropped by the client well before the server closes it
# (FTUNE_HEADER_TIMEOUT_S, keep-alive): else a request sent as the server closes it is reset,
# the keep-alive race every HTTP client must avoid, not a fault of the service.
KEEPALIVE_S = 1.0
# A process-wide capacity the service declares (FTUNE_MAX_EXPORTS, FTUNE_MAX_STREAMS,
# FTUNE_MAX_UNPACKS) answers 503 with Retry-After by design, fault or not: load shed, not an
# outage. Told apart by what the answer says.
AT_CAPACITY = ("every export slot is busy", "as many event streams open as it allows",
               "streaming and unpacking as many uploads as")


class RecordingClient:
    def __init__(self, base_url: str, key: str, actor: str, journal: Journal) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=TIMEOUT_S,
                                 headers={"Authorization": f"Bearer {key}"},
                                 limits=httpx.Limits(keepalive_expiry=KEEPALIVE_S))
        self.actor, self.journal = actor, journal

    def request(self, method: str, path: str, route: str, **kwargs: Any) -> httpx.Response | None:
        """``route``: the path's template (``/v1/jobs/{id}``), what the summary counts by.
        None when no answer came."""
        at = time.monotonic()
        response: httpx.Response | None = None
        error = ""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            error = f"{type(exc).__name__}: {exc}"
        status = response.status_code if response is not None else 0
        call = Call(at, self.actor, method, route, status, (time.monotonic() - at) * 1000,
                    during_fault=bool(self.journal.faults_at(at, slack_s=0)))
        self.journal.record(call, f"{method} {path}")
        self._judge(call, response, error)
        return response

    def _judge(self, call: Call, response: httpx.Response | None, error: str) -> None:
        if 0 < call.status < 500:
            return
        faults = self.journal.faults_at(call.at)
        if response is None:
            if "api_restart" not in faults:
                self.journal.violate("every request is answered",
                                     f"{call.method} {call.route} got no answer outside an API "
                                     f"restart ({error}; faults then: {sorted(faults)})")
            return
        if call.status == 503 and response.headers.get("retry-after") and (
                faults or any(phrase in response.text for phrase in AT_CAPACITY)):
            return
        if call.status == 507 and ("disk_full" in faults or self.journal.disk_low()):
            return
        self.journal.violate(
            "no 5xx but a 503 with Retry-After during a fault",
            f"{call.method} {response.request.url.path} answered {call.status} "
            f"(Retry-After: {response.headers.get('retry-after')}; faults then: "
            f"{sorted(faults) or 'none'}): {response.text[:300]}")

    def close(self) -> None:
        self.http.close()
