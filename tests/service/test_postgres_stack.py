"""The whole service on PostgreSQL: the API and a real worker over a fresh database, with the
job lifecycle users rely on (idempotent submit, progress, cancel, success, predictions)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from ftune.processes import Stack, wait_until
from ftune.service.auth.principal import Role
from ftune.testing.access import make_key
from ftune.testing.archives import zip_folder
from ftune.testing.postgres import fresh_database
from tests.service.conftest import FAST_LIFECYCLE, wait_for_job

QUICK = {"image_size": 32, "epochs": 2, "batch_size": 12, "seed": 2, "preset": "fast"}
SLOW = {"image_size": 64, "epochs": 20, "batch_size": 6, "freeze": {"strategy": "none"},
        "early_stopping": {"patience": 100}}


@pytest.fixture(scope="module")
def pg_client(postgres_server, redis_url, tmp_path_factory) -> Iterator[httpx.Client]:
    home = tmp_path_factory.mktemp("pg-home")
    # Queues of their own: the SQLite stack's worker never sees these jobs.
    broker = redis_url.rsplit("/", 1)[0] + "/5"
    with fresh_database(postgres_server) as url, Stack(
            home, env={**FAST_LIFECYCLE, "DATABASE_URL": url}, redis_url=broker,
            log_dir=home) as stack:
        stack.start_api()
        stack.start_worker("pg-worker@test")
        key = make_key(url, role=Role.ADMIN)
        with key.client(stack.api_url, timeout=60) as http:
            assert http.get("/healthz").json()["database"] == "ok"
            yield http


def test_a_job_runs_end_to_end_on_postgresql(pg_client, tiny_folder):
    dataset = pg_client.post("/v1/datasets", files={"file": ("t.zip", zip_folder(tiny_folder))})
    assert dataset.status_code == 201, dataset.text
    body = {"dataset_id": dataset.json()["id"], "spec": QUICK}
    first = pg_client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "pg-1"})
    again = pg_client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "pg-1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    done = wait_for_job(pg_client, first.json()["id"], timeout_s=180)
    assert done["status"] == "succeeded", done["error"]
    assert [row["epoch"] for row in done["metrics"]] == [1, 2]
    image = io.BytesIO()
    Image.open(next((tiny_folder / "animal1").iterdir())).save(image, "PNG")
    predicted = pg_client.post(f"/v1/models/{done['model_id']}/predict",
                               files={"files": ("a.png", image.getvalue())})
    assert predicted.status_code == 200 and len(predicted.json()["predictions"]) == 1


def test_cancel_a_running_job_on_postgresql(pg_client, tiny_folder):
    dataset = pg_client.post("/v1/datasets", files={"file": ("t.zip", zip_folder(tiny_folder))},
                             params={"dedupe": "false"}).json()
    job = pg_client.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": SLOW}).json()
    wait_until(lambda: pg_client.get(f"/v1/jobs/{job['id']}").json()["metrics"], 120,
               "a finished epoch")
    assert pg_client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    done = wait_for_job(pg_client, job["id"], timeout_s=120)
    assert done["status"] == "cancelled" and len(done["metrics"]) < SLOW["epochs"]
