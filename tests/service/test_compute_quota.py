"""The compute-hours quota end to end, with the real worker: a job's time on the worker is
charged to its tenant, the tenant's next job waits while it is over its quota (queued, with
the reason, never started), and runs once an operator raises the quota."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from uuid import uuid4

import httpx
import pytest

from ftune.testing.archives import zip_folder
from tests.service.conftest import wait_for_job, wait_until

QUICK = {"image_size": 32, "epochs": 1, "batch_size": 12, "preset": "fast"}
QUOTA_HOURS = 0.0001  # 0.36 s: a tiny job's first run takes it past


@pytest.fixture
def team(operator_client, api_url, worker) -> Iterator[httpx.Client]:
    """A tenant of its own (whose usage no other test adds to), with a small compute quota,
    and an admin client for it."""
    name = f"compute-{uuid4().hex[:8]}"
    created = operator_client.post("/v1/tenants", json={
        "name": name, "quotas": {"compute_hours": QUOTA_HOURS}})
    assert created.status_code == 201, created.text
    key = operator_client.post("/v1/keys", json={"name": "admin", "role": "admin",
                                                  "tenant": name}).json()["key"]
    with httpx.Client(base_url=api_url, timeout=120,
                      headers={"Authorization": f"Bearer {key}"}) as http:
        http.tenant = name  # type: ignore[attr-defined]
        yield http


def _seconds(job: dict) -> float:
    """The job's time on the worker, from its own record."""
    ended, started = (datetime.fromisoformat(job[k]) for k in ("finished_at", "started_at"))
    return (ended - started).total_seconds()


def _compute_s(http: httpx.Client) -> tuple[float, float]:
    """(used, limit): the tenant's compute seconds in the last 24 h, as it sees them."""
    view = http.get("/v1/usage").json()
    return view["usage"]["compute_s"], view["limits"]["compute_s"]


def test_compute_hours_are_charged_and_hold_the_next_job_until_raised(operator_client, team,
                                                                      tiny_folder):
    dataset = team.post("/v1/datasets", files={"file": ("t.zip", zip_folder(tiny_folder))},
                        params={"dedupe": "false"}).json()
    assert _compute_s(team) == (0.0, pytest.approx(QUOTA_HOURS * 3600))
    first = team.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": QUICK}).json()
    done = wait_for_job(team, first["id"], timeout_s=180)
    assert done["status"] == "succeeded", done["error"]
    # Charged with the time the job ran on the worker: from its claim to its end.
    used, limit = _compute_s(team)
    assert used == pytest.approx(_seconds(done), abs=0.5) and used > limit

    second = team.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": QUICK})
    assert second.status_code == 202, second.text  # accepted: this quota holds, not refuses
    job_id = second.json()["id"]
    held = wait_until(lambda: (j := team.get(f"/v1/jobs/{job_id}").json())["hold_reason"]
                      and j, 30, "the hold reason")
    assert held["hold_reason"].startswith("quota compute_hours: ")
    assert "worker hours used in the last 24 h" in held["hold_reason"]
    assert " of 0.0001 worker hours used" in held["hold_reason"], held["hold_reason"]
    # Three dispatcher rounds: still held, never started, nothing charged. (Polled, not one
    # sleep: an idle keep-alive connection is closed by the stack's 3 s header timeout.)
    until = time.monotonic() + 3
    while time.monotonic() < until:
        held = team.get(f"/v1/jobs/{job_id}").json()
        assert held["status"] == "queued" and held["started_at"] is None
        assert held["attempts"] == 0 and held["hold_reason"].startswith("quota compute_hours")
        time.sleep(0.5)
    assert _compute_s(team)[0] == pytest.approx(used, abs=1e-6)

    raised = operator_client.put(f"/v1/tenants/{team.tenant}/quotas",
                                 json={"compute_hours": 1})
    assert raised.status_code == 200, raised.text
    ran = wait_for_job(team, job_id, timeout_s=180)
    assert ran["status"] == "succeeded" and ran["hold_reason"] is None, ran["error"]
    assert _compute_s(team)[0] == pytest.approx(used + _seconds(ran), abs=1.0)
