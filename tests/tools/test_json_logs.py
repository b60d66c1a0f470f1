"""FTUNE_LOG_FORMAT=json: the processes of ``ftune up`` log JSON lines, and the lines a worker
logs while running a job carry the job's id and tenant."""

from __future__ import annotations

import json

import pytest

from ftune import Client

pytestmark = pytest.mark.processes


def test_a_jobs_worker_lines_are_json_with_its_id_and_tenant(up, tiny_folder):
    with Client(up.url, up.admin_key) as client:
        dataset = client.datasets.upload(tiny_folder)
        job = client.jobs.create(dataset, preset="fast", image_size=32, batch_size=12)
        job.wait(timeout=180)
    entries = []
    for line in up.log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))  # a line that starts as JSON is whole JSON
    assert entries and all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
    ours = [e for e in entries if e.get("job_id") == job.id]
    assert any(e["message"].endswith("ended: succeeded") for e in ours), ours
    assert {e["tenant"] for e in ours} == {job.raw["tenant_id"]}
    # The other processes' log lines are JSON too (the schema upgrade at start, for one);
    # Celery's start-up banner is printed, not logged.
    assert any(e["logger"].startswith(("alembic", "ftune.service.db")) for e in entries)
