"""Jobs and models through the API: bad input, failures a user can act on, and cancel."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from ftune.testing.blobs import local_blob
from tests.service.conftest import WORKER, wait_for_job, wait_until

UNKNOWN = "0123456789abcdef0123456789abcdef"
QUICK = {"image_size": 32, "epochs": 1, "batch_size": 8, "freeze": {"strategy": "head_only"}}


@pytest.mark.parametrize(("spec", "field"), [
    ({"optimizer": {"lr": -1}}, "optimizer.lr"),
    ({"epochs": 0}, "epochs"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"freeze": {"strategy": "sometimes"}}, "freeze.strategy"),
    ({"weights_path": "/etc/passwd"}, "weights_path"),
])
def test_invalid_spec_is_422_naming_the_field(client, tiny_dataset, spec, field):
    response = client.post("/v1/jobs", json={"dataset_id": tiny_dataset["id"], "spec": spec})
    assert response.status_code == 422
    assert field in response.json()["detail"]
    # For programs: where (the field's path), what, and the kind of error.
    errors = response.json()["errors"]
    assert ["spec", *field.split(".")] in [e["loc"] for e in errors], errors
    assert all(set(e) == {"loc", "msg", "type"} and e["msg"] for e in errors)


def test_job_request_errors(client, tiny_dataset):
    response = client.post("/v1/jobs", json={"dataset_id": UNKNOWN, "spec": {}})
    assert response.status_code == 404 and UNKNOWN in response.json()["detail"]
    response = client.post("/v1/jobs", json={"spec": {}})
    assert response.status_code == 422 and "dataset_id" in response.json()["detail"]
    response = client.post("/v1/jobs", json={"dataset_id": tiny_dataset["id"], "spec": [1]})
    assert response.status_code == 422 and "spec" in response.json()["detail"]
    response = client.post("/v1/jobs", content=b'{"dataset_id": "x",\n  "spec": {not json',
                           headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("the body is not valid JSON: ")
    assert response.json()["detail"].endswith("at line 2, column 12")
    for empty in ("", "   ", "../etc"):
        response = client.post("/v1/jobs", json={"dataset_id": empty, "spec": {}})
        assert response.status_code == 422, empty
        assert response.json()["errors"][0]["loc"] == ["dataset_id"]
        assert response.json()["detail"].startswith("dataset_id: ")
    assert client.get(f"/v1/jobs/{UNKNOWN}").status_code == 404
    assert client.post(f"/v1/jobs/{UNKNOWN}/cancel").status_code == 404
    response = client.get("/v1/jobs?status=sleeping")
    assert response.status_code == 422 and "status" in response.json()["detail"]


def test_model_request_errors(client):
    assert client.get(f"/v1/models/{UNKNOWN}").status_code == 404
    assert client.get(f"/v1/models/{UNKNOWN}/download").status_code == 404
    response = client.post(f"/v1/models/{UNKNOWN}/predict", files={"files": ("a.png", b"x")})
    assert response.status_code == 404


def test_a_failing_job_says_why(client, tiny_dataset, service_home):
    # Passes the submit checks (no worker memory is configured), but no machine holds it:
    # the worker's own estimate refuses it before building anything.
    spec = {**QUICK, "image_size": 1024, "batch_size": 4096, "freeze": {"strategy": "none"}}
    job = client.post("/v1/jobs", json={"dataset_id": tiny_dataset["id"], "spec": spec}).json()
    job = wait_for_job(client, job["id"], timeout_s=120)
    assert job["status"] == "failed"
    assert "this run needs" in job["error"] and "lower batch_size" in job["error"]
    assert "Traceback" not in job["error"] and job["model_id"] is None
    # The worker's log has one line for it, not a traceback: it is the user's to fix.
    log = (service_home / f"worker-{WORKER}.log").read_text()
    mine = [line for line in log.splitlines() if job["id"] in line]
    assert any("failed: this run needs" in line for line in mine), mine
    assert "raised unexpected" not in log.split(job["id"], 1)[1][:2000]
    assert "Traceback" not in log.split(job["id"], 1)[1][:2000]


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_cancel_queued_and_running_jobs(client, tiny_dataset, service_home):
    dataset_id = tiny_dataset["id"]
    # A job long enough to be caught running: every layer trains, many epochs.
    long_spec = {"image_size": 64, "epochs": 300, "batch_size": 12,
                 "freeze": {"strategy": "none"}, "early_stopping": {"patience": 1000}}
    running = client.post("/v1/jobs", json={"dataset_id": dataset_id, "spec": long_spec}).json()
    waiting = client.post("/v1/jobs", json={"dataset_id": dataset_id, "spec": QUICK}).json()

    # Metrics appear while the job runs, not only at the end.
    job = wait_until(lambda: (j := client.get(f"/v1/jobs/{running['id']}").json())["metrics"]
                     and j, 180, "the first epoch's metrics")
    assert job["status"] == "running" and job["metrics"][0]["epoch"] == 1
    # Each epoch's checkpoint is in the store (where another host would resume from).
    stored = local_blob(service_home, f"jobs/{running['id']}")
    wait_until(lambda: list((stored / "checkpoints").glob("attempt-0001.tar")), 30,
               "the first checkpoint in the store")

    # The second job waits behind the first (one worker, one job at a time).
    assert client.get(f"/v1/jobs/{waiting['id']}").json()["status"] == "queued"
    response = client.post(f"/v1/jobs/{waiting['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"

    # The dataset is in use by a running job.
    response = client.delete(f"/v1/datasets/{dataset_id}")
    assert response.status_code == 409 and "running" in response.json()["detail"]

    response = client.post(f"/v1/jobs/{running['id']}/cancel")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    job = wait_for_job(client, running["id"], timeout_s=60)
    assert job["status"] == "cancelled" and job["finished_at"]
    assert len(job["metrics"]) < 300 and job["model_id"] is None
    # Progress and the event stream agree on the epoch it stopped in.
    epochs_in_events = [json.loads(line[5:]).get("epoch")
                        for line in client.get(f"/v1/jobs/{running['id']}/events").text.splitlines()
                        if line.startswith("data:")]
    assert job["progress"]["epoch"] == max(e for e in epochs_in_events if e is not None)
    assert job["progress"]["epochs_done"] == len(job["metrics"])
    assert not (stored / "checkpoints").exists()  # partial files removed
    # After the job has ended the worker stores its last log lines, then removes its files:
    # once they are gone, nothing is left on the worker and the log in the store is whole.
    wait_until(lambda: not (service_home / "jobs" / running["id"]).exists(), 30,
               "the worker's files removed")
    assert [p.name for p in (stored / "logs").iterdir()] == ["attempt-0001.jsonl"]  # log stays
    # Cancel is idempotent; a finished job cannot be cancelled.
    assert client.post(f"/v1/jobs/{running['id']}/cancel").json()["status"] == "cancelled"

    # The worker takes the next job; the cancelled queued one never started.
    after = client.post("/v1/jobs", json={"dataset_id": dataset_id, "spec": QUICK}).json()
    done = wait_for_job(client, after["id"], timeout_s=120)
    assert done["status"] == "succeeded", done["error"]
    never = client.get(f"/v1/jobs/{waiting['id']}").json()
    assert never["status"] == "cancelled" and never["started_at"] is None
    assert never["attempts"] == 0 and never["metrics"] == []
    response = client.post(f"/v1/jobs/{after['id']}/cancel")
    assert response.status_code == 409 and "succeeded" in response.json()["detail"]
    listed = client.get("/v1/jobs", params={"status": "cancelled"}).json()["items"]
    cancelled = {j["id"] for j in listed}
    assert {running["id"], waiting["id"]} <= cancelled

    # Predict: bad images are named; top_k is checked; no files is an error.
    model_id = done["model_id"]
    response = client.post(f"/v1/models/{model_id}/predict",
                           files=[("files", ("good.png", _png_bytes())),
                                  ("files", ("broken.jpg", b"\xff\xd8 not a jpeg"))])
    assert response.status_code == 422 and "broken.jpg" in response.json()["detail"]
    response = client.post(f"/v1/models/{model_id}/predict",
                           files=[("files", ("empty.png", b""))])
    assert response.status_code == 422 and "empty.png" in response.json()["detail"]
    response = client.post(f"/v1/models/{model_id}/predict?top_k=0",
                           files=[("files", ("good.png", _png_bytes()))])
    assert response.status_code == 422 and "top_k" in response.json()["detail"]
    response = client.post(f"/v1/models/{model_id}/predict", data={"top_k": "many"},
                           files=[("files", ("good.png", _png_bytes()))])
    assert response.status_code == 422 and "top_k" in response.json()["detail"]
    response = client.post(f"/v1/models/{model_id}/predict", files={"top_k": (None, "2")})
    assert response.status_code == 422 and "files" in response.json()["detail"]
    response = client.post(f"/v1/models/{model_id}/predict", data={"top_k": "2"})
    assert response.status_code == 415
    response = client.post(f"/v1/models/{model_id}/predict", data={"top_k": "50"},
                           files=[("files", ("good.png", _png_bytes()))])
    assert response.status_code == 200
    assert len(response.json()["predictions"][0]) == 3  # capped at the number of classes


def test_ids_that_cannot_exist_are_404_and_numbers_must_be_finite(client, tiny_dataset):
    for path in ("/v1/jobs/%00", "/v1/models/abc", "/v1/datasets/..%2F..%2Fetc"):
        assert client.get(path).status_code == 404, path
    response = client.post("/v1/jobs", content=b'{"dataset_id": "%s", "spec": {"early_stopping":'
                           b' {"min_delta": Infinity}}}' % tiny_dataset["id"].encode(),
                           headers={"content-type": "application/json"})
    assert response.status_code == 422 and "finite" in response.json()["detail"]
