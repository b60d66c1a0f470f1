"""The API with its dependencies down, in-process over a real (closed) Redis port."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from ftune.processes import free_port
from ftune.service.app import create_app
from ftune.service.settings import Settings
from ftune.testing.archives import zip_folder


@pytest.fixture
def redis_down_client(tmp_path):
    # A port nothing listens on: connections are refused at once.
    settings = Settings(home=tmp_path / "home", redis_url=f"redis://127.0.0.1:{free_port()}/0",
                        auth="off")
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as http:
        yield http


def test_health_is_503_naming_redis(redis_down_client):
    response = redis_down_client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable" and body["database"] == "ok"
    assert body["redis"].startswith("down")


def test_submit_with_redis_down_is_503_and_the_job_is_not_left_queued(redis_down_client,
                                                                      tiny_folder):
    dataset = redis_down_client.post("/v1/datasets",
                                     files={"file": ("t.zip", zip_folder(tiny_folder))}).json()
    response = redis_down_client.post("/v1/jobs", json={"dataset_id": dataset["id"]})
    assert response.status_code == 503 and "Redis" in response.json()["detail"]
    jobs = redis_down_client.get("/v1/jobs").json()["items"]
    assert len(jobs) == 1 and jobs[0]["status"] == "failed"
    assert "submit again" in jobs[0]["error"]
    # The dataset is untouched and can be deleted: no job holds it.
    assert redis_down_client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204


def test_database_down_is_503_not_500(tmp_path):
    # PostgreSQL on a port nothing listens on: the API starts and says what is down.
    settings = Settings(home=tmp_path / "home", redis_url=f"redis://127.0.0.1:{free_port()}/0",
                        database_url=f"postgresql://nobody@127.0.0.1:{free_port()}/nothing",
                        auth="off")
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as http:
        health = http.get("/healthz")
        assert health.status_code == 503 and health.json()["database"].startswith("down")
        response = http.get("/v1/jobs")
        assert response.status_code == 503 and "database" in response.json()["detail"]
