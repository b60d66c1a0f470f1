"""Event kinds live in one place (``service/events.py``): every kind written is a member of
``EventKind``, every kind is documented on a stream, and the API's docs list them all."""

from __future__ import annotations

import ast
from pathlib import Path

from ftune.service.app import create_app
from ftune.service.events import JOB_EVENTS, SWEEP_EVENTS, EventKind
from ftune.service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_kind_is_carried_by_a_stream():
    assert set(JOB_EVENTS) | set(SWEEP_EVENTS) == set(EventKind)


def _event_kind_arguments() -> list[tuple[str, ast.expr]]:
    """The kind argument of every ``add_event`` call in the service and the workers."""
    found = []
    for folder in ("service", "workers"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id == "add_event" and len(node.args) >= 3):
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno}", node.args[2]))
    return found


def test_events_are_written_with_the_constants():
    calls = _event_kind_arguments()
    assert calls, "no add_event calls found: has the function moved?"
    literal = [where for where, kind in calls if isinstance(kind, ast.Constant)]
    assert not literal, f"write EventKind.<KIND>, not a string: {literal}"


def test_the_event_routes_document_every_kind(tmp_path):
    settings = Settings(home=tmp_path, auth="off", redis_url="redis://127.0.0.1:1/0")  # unused
    app = create_app(settings)
    try:
        paths = app.openapi()["paths"]
    finally:
        app.state.ctx.db.dispose()  # no database file left open for later tests to see go
    streams = {"/v1/jobs/{job_id}/events": JOB_EVENTS,
               "/v1/sweeps/{sweep_id}/events": SWEEP_EVENTS}
    for path, kinds in streams.items():
        description = paths[path]["get"]["description"]
        for kind, meaning in kinds.items():
            assert f"``{kind}`` ({meaning})" in description, (path, kind)
