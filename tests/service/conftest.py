"""A real stack for the service tests: a private Redis, one Celery worker process and the API
process, sharing a fresh data directory. Started once per session through the same harness
as `ftune up` (ftune.processes)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ftune.processes import Stack, wait_until
from ftune.service.auth.principal import Role
from ftune.testing.access import Key, make_key
from ftune.testing.archives import zip_folder

MAX_UPLOAD_MB = 8  # small, so the 413 test needs only a few MB
WORKER = "test-worker@localhost"
FAST_LIFECYCLE = {"FTUNE_CANCEL_POLL_S": "0.2", "FTUNE_PROGRESS_INTERVAL_S": "0.2",
                  "FTUNE_WORKER_HEARTBEAT_S": "1",
                  # The suite uploads and submits far faster than any person; rate limits
                  # have tests of their own.
                  "FTUNE_RATE_UPLOADS": "100000/minute", "FTUNE_RATE_JOBS": "100000/minute",
                  "FTUNE_RATE_PREDICTIONS": "100000/minute",
                  # Tests upload side by side and make keys in one tenant; the tenant
                  # limits have tests of their own (test_tenant_limits.py).
                  "FTUNE_MAX_UPLOADS_PER_TENANT": "16", "FTUNE_MAX_UNPACKS": "16",
                  "FTUNE_MAX_KEYS_PER_TENANT": "1000",
                  # Short, so the slow-client tests wait seconds, not minutes.
                  "FTUNE_HEADER_TIMEOUT_S": "3", "FTUNE_UPLOAD_IDLE_TIMEOUT_S": "3",
                  # Predictions stay on one engine, so tests comparing scores across calls
                  # compare like with like; the engines have tests of their own
                  # (test_serving_engines.py, with the default auto).
                  "FTUNE_SERVE_ENGINE": "torch"}


@pytest.fixture(scope="session")
def service_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ftune-home")


@pytest.fixture(scope="session")
def stack(service_home) -> Iterator[Stack]:
    """Redis (REDIS_URL when given, else private), the API and one worker, as processes."""
    env = {**FAST_LIFECYCLE, "FTUNE_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB)}
    with Stack(service_home, env=env, redis_url=os.environ.get("REDIS_URL"),
               log_dir=service_home) as running:
        if not running.redis_url:
            running.start_redis(password="test-redis-password")
        yield running


@pytest.fixture(scope="session")
def redis_url(stack) -> str:
    return stack.redis_url


@pytest.fixture(scope="session")
def worker(stack):
    """One real Celery worker process."""
    return stack.start_worker(WORKER)


@pytest.fixture(scope="session")
def api_url(stack) -> str:
    """The API as its own process, exactly as `ftune api` runs it."""
    return stack.start_api()


@pytest.fixture(scope="session")
def database_of_stack(service_home) -> str:
    return f"sqlite:///{service_home / 'ftune.db'}"


@pytest.fixture(scope="session")
def access(api_url, database_of_stack) -> dict[str, Key]:
    """Keys of two tenants (team-a, team-b: an admin and a member each) and an operator."""
    keys = {"operator": make_key(database_of_stack, role=Role.OPERATOR)}
    for team in ("a", "b"):
        for role in (Role.ADMIN, Role.MEMBER):
            keys[f"{team}-{role}"] = make_key(database_of_stack, role=role, tenant=f"team-{team}")
    return keys


@pytest.fixture(scope="session")
def client(api_url, worker, access) -> Iterator[httpx.Client]:
    """An admin of tenant team-a: what most service tests act as."""
    with access["a-admin"].client(api_url, timeout=120) as http:
        yield http


@pytest.fixture(scope="session")
def client_b(api_url, access) -> Iterator[httpx.Client]:
    """An admin of the other tenant, team-b."""
    with access["b-admin"].client(api_url, timeout=120) as http:
        yield http


@pytest.fixture(scope="session")
def member_client(api_url, access) -> Iterator[httpx.Client]:
    with access["a-member"].client(api_url, timeout=120) as http:
        yield http


@pytest.fixture(scope="session")
def operator_client(api_url, access) -> Iterator[httpx.Client]:
    with access["operator"].client(api_url, timeout=120) as http:
        yield http


@pytest.fixture(scope="session")
def tiny_dataset(client, tiny_folder) -> dict:
    """3 classes × 12 real images, uploaded once."""
    response = client.post("/v1/datasets", files={"file": ("tiny.zip", zip_folder(tiny_folder))},
                           data={"name": "tiny"}, params={"dedupe": "false"})
    assert response.status_code == 201, response.text
    return response.json()


def wait_for_job(client: httpx.Client, job_id: str, timeout_s: float = 300,
                 statuses: tuple[str, ...] = ("succeeded", "failed", "cancelled", "pruned")
                 ) -> dict:
    def done() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_until(done, timeout_s, f"job {job_id} to reach {statuses}", interval_s=0.3)


@pytest.fixture(scope="session")
def tiny_model(client, tiny_dataset) -> dict:
    """A model trained on ``tiny_dataset`` (32 px, one epoch), once."""
    job = client.post("/v1/jobs", json={"dataset_id": tiny_dataset["id"], "spec": {
        "image_size": 32, "epochs": 1, "batch_size": 12, "preset": "fast"}}).json()
    done = wait_for_job(client, job["id"], timeout_s=180)
    assert done["status"] == "succeeded", done["error"]
    return client.get(f"/v1/models/{done['model_id']}").json()
