"""A job's worker log lines: tagged with the job and tenant, kept per job for its tenant's
admins, with server paths redacted."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftune.service.logs import redact
from tests.service.conftest import wait_for_job

QUICK = {"preset": "fast", "image_size": 32, "batch_size": 12}


@pytest.mark.processes
def test_an_admin_reads_the_jobs_log_lines_and_no_one_else_does(client, member_client,
                                                                client_b, tiny_dataset,
                                                                service_home):
    job = client.post("/v1/jobs", json={"dataset_id": tiny_dataset["id"], "spec": QUICK}).json()
    done = wait_for_job(client, job["id"], timeout_s=180)
    assert done["status"] == "succeeded", done["error"]
    response = client.get(f"/v1/jobs/{job['id']}/logs")
    assert response.status_code == 200, response.text
    lines = response.json()["lines"]
    messages = [line["message"] for line in lines]
    assert any("attempt 1 started" in m for m in messages), messages
    assert any(m.endswith("ended: succeeded") for m in messages), messages
    assert {line["job_id"] for line in lines} == {job["id"]}
    assert {line["tenant"] for line in lines} == {done["tenant_id"]}
    assert all(line["ts"] and line["level"] and line["logger"] for line in lines)
    assert str(service_home) not in response.text and str(Path.home()) not in response.text
    assert len(client.get(f"/v1/jobs/{job['id']}/logs", params={"tail": 1}).json()
               ["lines"]) == 1
    assert client.get(f"/v1/jobs/{job['id']}/logs", params={"tail": 0}).status_code == 422
    assert member_client.get(f"/v1/jobs/{job['id']}/logs").status_code == 403
    assert client_b.get(f"/v1/jobs/{job['id']}/logs").status_code == 404


def test_server_paths_are_redacted(tmp_path):
    home = tmp_path / "home"
    text = (f"decoded {home}/datasets/abc/train/cat/1.png; weights at /usr/lib/python3/x.pt; "
            "see http://127.0.0.1:8000/v1/jobs and ratio 3/4")
    assert redact(text, home) == ("decoded <data>/datasets/abc/train/cat/1.png; weights at "
                                  "<path>/x.pt; see http://127.0.0.1:8000/v1/jobs and ratio 3/4")
