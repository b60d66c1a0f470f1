"""What can be checked without the data is checked at submit: backbones this server offers,
sizes a worker can hold. Over HTTP, a spec never reaches a worker to fail there."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

QUICK = {"image_size": 32, "epochs": 1, "batch_size": 12, "preset": "fast"}


def _submit(client, dataset_id: str, spec: dict):
    return client.post("/v1/jobs", json={"dataset_id": dataset_id, "spec": {**QUICK, **spec}})


def test_an_unknown_backbone_is_a_422_listing_what_is_available(client, tiny_dataset):
    response = _submit(client, tiny_dataset["id"], {"backbone": "no_such_net"})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith("backbone: 'no_such_net' is not available")
    assert "tf_efficientnet_lite0" in detail and "resnet18" in detail


def test_timm_architectures_train_from_scratch_but_have_no_weights_here(client, tiny_dataset):
    refused = _submit(client, tiny_dataset["id"], {"backbone": "resnet10t"})
    assert refused.status_code == 422 and "pretrained: false" in refused.json()["detail"]
    accepted = _submit(client, tiny_dataset["id"], {"backbone": "resnet10t",
                                                    "pretrained": False})
    assert accepted.status_code == 202
    client.post(f"/v1/jobs/{accepted.json()['id']}/cancel")
    too_big = _submit(client, tiny_dataset["id"], {"backbone": "resnet101",
                                                   "pretrained": False})
    assert too_big.status_code == 422  # over FTUNE_BACKBONE_MAX_PARAMS_M


def test_a_head_wider_than_4096_is_refused(client, tiny_dataset):
    response = _submit(client, tiny_dataset["id"], {"head": {"hidden": [65536]}})
    assert response.status_code == 422 and "head.hidden" in response.json()["detail"]


def test_the_backbone_catalog_says_what_each_offers(client):
    rows = {row["name"]: row for row in client.get("/v1/backbones").json()["items"]}
    assert rows["tf_efficientnet_lite0"]["pretrained_offline"] is True
    assert rows["tf_efficientnet_lite0"]["input_size"] == 224
    assert rows["resnet18"]["pretrained_offline"] is False
    assert rows["resnet18"]["num_params"] > 10_000_000


@pytest.mark.processes
def test_listing_backbones_does_not_load_torch(tmp_path):
    code = ("import json, sys\n"
            "from fastapi.testclient import TestClient\n"
            "from ftune.service.app import create_app\n"
            "from ftune.service.settings import Settings\n"
            f"app = create_app(Settings(home={str(tmp_path)!r}, auth='off',"
            " redis_url='redis://127.0.0.1:1/0'))\n"
            "with TestClient(app, base_url='http://127.0.0.1') as http:\n"
            "    rows = http.get('/v1/backbones').json()['items']\n"
            "print(json.dumps([len(rows), 'torch' in sys.modules, 'timm' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    count, torch_loaded, timm_loaded = json.loads(out.strip().splitlines()[-1])
    assert count > 10 and not torch_loaded and not timm_loaded


def test_a_spec_no_worker_could_hold_is_refused_at_submit_when_workers_are_known(tmp_path):
    from ftune.service.db.tables import Dataset
    from ftune.service.errors import InvalidInput
    from ftune.service.jobs import _check_fits_a_worker, validate_job_spec
    from ftune.service.settings import Settings

    settings = Settings(home=tmp_path, worker_memory_gb=2)
    dataset = Dataset(classes=["a", "b"], num_images=100)
    _check_fits_a_worker(validate_job_spec({"image_size": 96}), dataset, settings)
    with pytest.raises(InvalidInput, match="more than the workers' 2 GB"):
        _check_fits_a_worker(validate_job_spec({"image_size": 512, "batch_size": 256,
                                                "freeze": {"strategy": "none"}}),
                             dataset, settings)


def test_a_job_over_the_operators_device_cap_is_refused_one_no_worker_has_waits(redis_url,
                                                                              tmp_path):
    from fastapi.testclient import TestClient

    from ftune.service.app import create_app
    from ftune.service.db.session import Database
    from ftune.service.db.tables import DEFAULT_TENANT_ID, Dataset
    from ftune.service.settings import Settings

    # A Redis database of its own: no worker is live there, and none takes what is enqueued.
    broker = redis_url.rsplit("/", 1)[0] + "/10"
    settings = Settings(home=tmp_path / "home", auth="off", redis_url=broker, max_job_devices=2)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as http:
        db = Database(settings.resolved_database_url)
        with db.session() as session:
            session.add(Dataset(id="d" * 32, tenant_id=DEFAULT_TENANT_ID, name="d",
                                classes=["a", "b"], class_counts={}, num_images=40,
                                splits={}, warnings=[]))
        db.dispose()
        refused = _submit(http, "d" * 32, {"devices": 4})
        assert refused.status_code == 422
        assert refused.json()["detail"] == ("spec.devices: 4 asked, more than the 2 a job may "
                                            "have here (FTUNE_MAX_JOB_DEVICES); ask for 2 or "
                                            "fewer, or auto")
        assert refused.json()["errors"][0]["loc"] == ["spec", "devices"]
        assert http.get("/v1/jobs").json()["items"] == []
        waiting = _submit(http, "d" * 32, {"devices": 2})
        assert waiting.status_code == 202, waiting.text
        job = http.get(f"/v1/jobs/{waiting.json()['id']}").json()
        assert job["status"] == "queued"
        assert job["hold_reason"] == "waiting for a worker with 2 devices (no worker is live)"
        http.post(f"/v1/jobs/{job['id']}/cancel")
