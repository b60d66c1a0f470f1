"""Event kinds live in one place (``service/events.py``): every kind written is a member of
``EventKind``, every kind is documented on a stream, and the API's docs list them all. Event
ids count 1, 2, 3 ... within a job, whatever other tenants' jobs write meanwhile."""

from __future__ import annotations

import ast
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import select

from ftune.service.app import create_app
from ftune.service.db import migrate
from ftune.service.db.session import Database
from ftune.service.db.tables import JobEvent
from ftune.service.events import JOB_EVENTS, SWEEP_EVENTS, EventKind, add_event
from ftune.service.settings import Settings
from ftune.testing.archives import zip_folder
from ftune.testing.sse import read_events
from tests.service.conftest import wait_for_job

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


def test_writers_racing_on_two_jobs_number_each_job_without_gaps(database_url):
    """Four threads write events of two jobs at once, each event its own transaction: on
    PostgreSQL they pick the same numbers and retry; on SQLite they wait for the lock."""
    db = Database(database_url, prepare=migrate.upgrade)
    jobs, per_thread = ["a" * 32, "b" * 32], 15

    def write(thread: int) -> list[int]:
        numbers = []
        for i in range(per_thread):
            with db.session() as session:
                numbers.append(add_event(session, jobs[(thread + i) % 2], EventKind.NOTE,
                                         message=f"{thread}-{i}"))
        return numbers

    try:
        with ThreadPoolExecutor(4) as pool:
            returned = [n for numbers in pool.map(write, range(4)) for n in numbers]
        with db.session() as session:
            stored = {job: list(session.scalars(select(JobEvent.seq).where(
                JobEvent.job_id == job).order_by(JobEvent.id))) for job in jobs}
    finally:
        db.dispose()
    for job in jobs:
        assert sorted(stored[job]) == list(range(1, 2 * per_thread + 1)), job
        assert stored[job] == sorted(stored[job]), "numbers follow the order rows were written"
    assert sorted(returned) == sorted(stored[jobs[0]] + stored[jobs[1]])


QUICK = {"image_size": 32, "epochs": 1, "batch_size": 12, "preset": "fast"}


def test_two_tenants_jobs_interleaving_each_stream_counts_from_one(client, client_b,
                                                                   tiny_dataset, tiny_folder):
    upload = client_b.post("/v1/datasets", files={"file": ("t.zip", zip_folder(tiny_folder))},
                           params={"dedupe": "false"})
    assert upload.status_code == 201, upload.text
    pairs = ((client, tiny_dataset["id"]), (client_b, upload.json()["id"]))
    # Submissions and cancels alternate between the tenants, so their events interleave.
    jobs = [http.post("/v1/jobs", json={"dataset_id": dataset, "spec": QUICK}).json()["id"]
            for http, dataset in pairs]
    for (http, _), job in zip(pairs, jobs, strict=True):
        assert http.post(f"/v1/jobs/{job}/cancel").status_code in (200, 202)
    for (http, _), job in zip(pairs, jobs, strict=True):
        wait_for_job(http, job, timeout_s=120)
        events = read_events(http, f"/v1/jobs/{job}/events")
        ids = [int(e["id"]) for e in events]
        assert ids == list(range(1, len(ids) + 1)) and len(ids) >= 2, events
        assert events[-1]["data"]["status"] == "cancelled"
        resumed = read_events(http, f"/v1/jobs/{job}/events", last_event_id=1)
        assert [int(e["id"]) for e in resumed] == ids[1:]
        # An id from before events were numbered per job (higher than any of this job's)
        # replays the job from its start rather than skipping it all, final status too.
        stale = read_events(http, f"/v1/jobs/{job}/events", last_event_id=10**6)
        assert [int(e["id"]) for e in stale] == ids
