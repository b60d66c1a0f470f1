"""Quotas answer 429 naming the limit and store nothing; run-time quotas hold jobs back and
say why; usage drops when things are deleted; fair share across tenants with one real
worker; operators remove tenants."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from ftune.testing.archives import zip_folder
from ftune.testing.blobs import local_blob, stored_dataset, stored_model
from tests.service.conftest import wait_for_job, wait_until

QUICK = {"image_size": 32, "epochs": 1, "batch_size": 12, "preset": "fast"}
SLOW = {"image_size": 64, "epochs": 50, "batch_size": 6, "freeze": {"strategy": "none"},
        "early_stopping": {"patience": 100}}


@pytest.fixture
def team(operator_client, api_url, worker, request) -> Iterator[httpx.Client]:
    """A tenant of its own (named after the test) and an admin client for it."""
    name = "q-" + request.node.name.replace("_", "-")[5:40].strip("-").lower()
    assert operator_client.post("/v1/tenants", json={"name": name}).status_code == 201
    key = operator_client.post("/v1/keys", json={"name": "admin", "role": "admin",
                                                  "tenant": name}).json()["key"]
    with httpx.Client(base_url=api_url, timeout=120,
                      headers={"Authorization": f"Bearer {key}"}) as http:
        http.tenant = name  # type: ignore[attr-defined]
        yield http


def _quotas(operator_client, team, **quotas) -> None:
    response = operator_client.put(f"/v1/tenants/{team.tenant}/quotas", json=quotas)
    assert response.status_code == 200, response.text


def _upload(http, folder, **params) -> httpx.Response:
    return http.post("/v1/datasets", files={"file": ("t.zip", zip_folder(folder))},
                     params={"dedupe": "false", **params})


def _stored_datasets(home) -> list[str]:
    """Every dataset object in the store, and what an upload unpacks into meanwhile."""
    return sorted([p.name for p in (home / "datasets").iterdir()]
                  + [p.parent.name for p in (home / "blobs" / "datasets").glob("*/*")])


def test_dataset_and_storage_quotas_are_429_and_store_nothing(operator_client, team,
                                                             tiny_folder, service_home):
    _quotas(operator_client, team, datasets=1)
    assert _upload(team, tiny_folder).status_code == 201
    before = _stored_datasets(service_home)
    over = _upload(team, tiny_folder)
    assert over.status_code == 429
    assert "quota datasets exceeded: 1 datasets of 1" in over.json()["detail"]
    assert len(team.get("/v1/datasets").json()["items"]) == 1
    assert _stored_datasets(service_home) == before

    used = team.get("/v1/usage").json()["usage"]["stored_bytes"]
    _quotas(operator_client, team, datasets=5, stored_gb=(used + 1000) / 2**30)
    over = _upload(team, tiny_folder)  # about 12 kB: over what is left
    assert over.status_code == 429 and "quota stored_gb exceeded" in over.json()["detail"]
    assert len(team.get("/v1/datasets").json()["items"]) == 1
    assert _stored_datasets(service_home) == before


def test_job_quotas_are_429_and_store_nothing(operator_client, team, tiny_folder):
    dataset = _upload(team, tiny_folder).json()
    _quotas(operator_client, team, epoch_images=30)  # 36 images × 1 epoch is over
    over = team.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": QUICK})
    assert over.status_code == 429 and "quota epoch_images exceeded" in over.json()["detail"]
    assert team.get("/v1/jobs").json()["items"] == []

    _quotas(operator_client, team, active_jobs=1)
    first = team.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": SLOW})
    assert first.status_code == 202
    over = team.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": QUICK})
    assert over.status_code == 429 and "quota active_jobs exceeded: 1" in over.json()["detail"]
    assert len(team.get("/v1/jobs").json()["items"]) == 1
    team.post(f"/v1/jobs/{first.json()['id']}/cancel")
    wait_for_job(team, first.json()["id"], timeout_s=120)


def test_a_running_jobs_quota_holds_the_job_back_and_says_why(operator_client, team,
                                                              tiny_folder):
    dataset = _upload(team, tiny_folder).json()
    _quotas(operator_client, team, running_jobs=0)
    job = team.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": QUICK}).json()
    held = wait_until(lambda: (j := team.get(f"/v1/jobs/{job['id']}").json())["hold_reason"]
                      and j, 30, "the hold reason")
    assert held["status"] == "queued" and "quota running_jobs: 0 of 0" in held["hold_reason"]
    _quotas(operator_client, team, running_jobs=1)
    done = wait_for_job(team, job["id"], timeout_s=120)
    assert done["status"] == "succeeded" and done["hold_reason"] is None


def test_usage_drops_when_things_are_deleted(team, tiny_folder):
    empty = team.get("/v1/usage").json()["usage"]
    dataset = _upload(team, tiny_folder).json()
    with_data = team.get("/v1/usage").json()["usage"]
    assert with_data["datasets"] == empty["datasets"] + 1
    assert with_data["stored_bytes"] == empty["stored_bytes"] + dataset["size_bytes"] > 0

    job = team.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": QUICK}).json()
    done = wait_for_job(team, job["id"], timeout_s=180)
    model = team.get(f"/v1/models/{done['model_id']}").json()
    assert team.get("/v1/usage").json()["usage"]["stored_bytes"] == (
        with_data["stored_bytes"] + model["size_bytes"])
    assert team.get(f"/v1/models/{model['id']}/download").status_code == 200
    exports = team.get(f"/v1/models/{model['id']}").json()["exports_bytes"]
    assert exports > 0
    assert team.get("/v1/usage").json()["usage"]["stored_bytes"] == (
        with_data["stored_bytes"] + model["size_bytes"] + exports)
    assert team.delete(f"/v1/models/{model['id']}/exports").status_code == 204
    assert team.get(f"/v1/models/{model['id']}").json()["exports_bytes"] == 0

    assert team.delete(f"/v1/jobs/{job['id']}").status_code == 409  # its model still exists
    assert team.put("/v1/models/aliases/live", json={"model": model["id"]}).status_code == 200
    refused = team.delete(f"/v1/models/{model['id']}")
    assert refused.status_code == 409 and "live" in refused.json()["detail"]
    assert team.delete(f"/v1/models/{model['id']}", params={"force": "true"}).status_code == 204
    assert team.get(f"/v1/models/{model['id']}").status_code == 404
    assert team.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert team.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert team.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert team.get("/v1/usage").json()["usage"] == empty


def test_fair_share_one_job_of_another_tenant_does_not_wait_behind_many(client, client_b,
                                                                       tiny_folder):
    a_data = _upload(client, tiny_folder).json()
    b_data = _upload(client_b, tiny_folder).json()
    a_jobs = [client.post("/v1/jobs", json={"dataset_id": a_data["id"], "spec": QUICK}).json()
              for _ in range(6)]
    b_job = client_b.post("/v1/jobs", json={"dataset_id": b_data["id"], "spec": QUICK}).json()
    done_a = [wait_for_job(client, j["id"], timeout_s=300) for j in a_jobs]
    done_b = wait_for_job(client_b, b_job["id"], timeout_s=300)
    order = sorted([(j["started_at"], f"A{i + 1}") for i, j in enumerate(done_a)]
                   + [(done_b["started_at"], "B")])
    started = [name for _, name in order]
    assert started.index("B") < started.index("A3"), started  # one worker, two tenants


def test_operators_remove_a_tenant_and_everything_it_owns(operator_client, team, tiny_folder,
                                                          service_home):
    dataset = _upload(team, tiny_folder).json()
    job = team.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": QUICK}).json()
    done = wait_for_job(team, job["id"], timeout_s=180)
    assert stored_model(service_home, done["model_id"]).is_file()
    assert stored_dataset(service_home, dataset["id"]).is_file()
    assert operator_client.delete(f"/v1/tenants/{team.tenant}").status_code == 204
    # Its keys went with it (API processes trust a key for at most a second).
    wait_until(lambda: team.get("/v1/datasets").status_code == 401, 3, "its key to stop")
    assert operator_client.get(f"/v1/datasets/{dataset['id']}").status_code == 404
    assert operator_client.get(f"/v1/models/{done['model_id']}").status_code == 404
    assert not stored_dataset(service_home, dataset["id"]).exists()
    assert not stored_model(service_home, done["model_id"]).exists()
    assert not local_blob(service_home, f"jobs/{job['id']}").exists()
    assert operator_client.delete("/v1/tenants/default").status_code == 409
