"""Read a job's or a sweep's Server-Sent Events to their end, as any SSE client would."""

from __future__ import annotations

import json

import httpx


def read_events(http: httpx.Client, path: str, last_event_id: int | None = None) -> list[dict]:
    """``[{"id", "event", "data"}, ...]`` from ``GET path`` until the server ends the stream;
    ``data`` parsed as JSON."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    events: list[dict] = []
    current: dict[str, object] = {}
    with http.stream("GET", path, headers=headers,
                     timeout=httpx.Timeout(120, read=60)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "data" in current:
                    events.append(current)
                current = {}
            elif line.startswith(("id:", "event:", "data:")):
                key, _, value = line.partition(":")
                current[key] = json.loads(value) if key == "data" else value.strip()
    return events
