"""`ftune serve`: a predict-only server on the same database and data directory."""

from __future__ import annotations

import io
import os
import subprocess

import httpx
import pytest
from PIL import Image

from ftune.models.training.fit import fit
from ftune.processes import free_port, ftune_command, stop_process, wait_until
from ftune.service.auth.principal import Role
from ftune.service.db import migrate
from ftune.service.db.session import Database
from ftune.service.db.tables import DEFAULT_TENANT_ID, Job, TunedModel
from ftune.service.storage import Storage
from ftune.testing.access import make_key
from ftune.testing.models import store_bundle

pytestmark = pytest.mark.processes


def test_serve_answers_predictions_without_redis(tiny_folder, tmp_path):
    home = tmp_path / "home"
    storage = Storage(home)
    storage.prepare()
    result = fit(tiny_folder, {"image_size": 32, "epochs": 1})
    model_id = "c" * 32
    stored = store_bundle(storage, result, model_id)
    db = Database(f"sqlite:///{home / 'ftune.db'}", prepare=migrate.upgrade)
    with db.session() as session:
        session.add(Job(id="d" * 32, tenant_id=DEFAULT_TENANT_ID, dataset_id="e" * 32, spec={},
                        epochs=1, status="succeeded"))
        session.flush()
        session.add(TunedModel(id=model_id, tenant_id=DEFAULT_TENANT_ID, job_id="d" * 32,
                               dataset_id="e" * 32, name="tiny", version=1,
                               backbone=result.backbone, classes=result.classes,
                               blob_sha256=stored.sha256,
                               metrics={}, spec=result.spec.model_dump(mode="json")))
    db.dispose()
    member = make_key(f"sqlite:///{home / 'ftune.db'}", role=Role.MEMBER)
    other = make_key(f"sqlite:///{home / 'ftune.db'}", role=Role.ADMIN, tenant="someone-else")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    server = subprocess.Popen(ftune_command("serve", "--home", str(home), "--port", str(port)),
                              env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "ftune serve")
        health = httpx.get(f"{url}/healthz", headers=member.headers).json()
        assert health["redis"] == "not used (ftune serve)"
        assert "memory" in health["rate_limits"]  # no Redis: limits kept in this process
        http = member.client(url, timeout=60)
        assert [m["id"] for m in http.get("/v1/models").json()["items"]] == [model_id]
        assert httpx.get(f"{url}/v1/models").status_code == 401  # keys are needed here too
        image = io.BytesIO()
        Image.open(next((tiny_folder / "animal1").iterdir())).save(image, "PNG")
        files = {"files": ("a.png", image.getvalue())}
        response = http.post("/v1/models/tiny:1/predict", files=files)
        assert response.status_code == 200
        assert {p["label"] for p in response.json()["predictions"][0]} == set(result.classes)
        # Loaded now, and looked up by id: still not another tenant's to use.
        assert http.post(f"/v1/models/{model_id}/predict", files=files).status_code == 200
        assert other.client(url).post(f"/v1/models/{model_id}/predict",
                                      files=files).status_code == 404
        assert http.get("/v1/jobs").status_code == 404  # no training side here
    finally:
        stop_process(server)
