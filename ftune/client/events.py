"""Server-sent events of a job, followed across dropped connections with ``Last-Event-ID``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from ftune.client.transport import RETRY_ERRORS, Transport

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "pruned"})


@dataclass(frozen=True)
class Event:
    id: int
    kind: str  # status | stage | resolved | epoch | progress | note
    data: dict[str, Any]


def parse_events(lines: Iterator[str]) -> Iterator[Event | int]:
    """Events from SSE lines; an int is a ``retry:`` advice in milliseconds."""
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in fields:
                yield Event(int(fields.get("id", "0") or 0), fields.get("event", "message"),
                            json.loads(fields["data"]))
            fields = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "retry" and value.isdigit():
            yield int(value)
        elif name == "data" and "data" in fields:
            fields["data"] += "\n" + value
        else:
            fields[name] = value


def follow(transport: Transport, job_id: str, last_event_id: int = 0,
           reconnects: int = 20, *, collection: str = "jobs") -> Iterator[Event]:
    """Every event of the job (or of the sweep, with ``collection="sweeps"``) after
    ``last_event_id``, until its final status. A dropped connection is resumed where it
    stopped; ``reconnects`` bounds consecutive failures."""
    retry_s, failures = 2.0, 0
    while True:
        try:
            response = transport.stream("GET", f"/{collection}/{job_id}/events", headers={
                "Accept": "text/event-stream", "Last-Event-ID": str(last_event_id)})
            try:
                for item in parse_events(response.iter_lines()):
                    if isinstance(item, int):
                        retry_s = item / 1000
                        continue
                    failures, last_event_id = 0, item.id
                    yield item
                    if item.kind == "status" and item.data.get("status") in TERMINAL:
                        return
            finally:
                response.close()
        except (*RETRY_ERRORS, httpx.ReadTimeout):
            failures += 1
            if failures > reconnects:
                raise
        else:  # the server ended the stream: over if the job is, else it is resumed
            if transport.request("GET", f"/{collection}/{job_id}").json()["status"] in TERMINAL:
                return
        time.sleep(retry_s)
