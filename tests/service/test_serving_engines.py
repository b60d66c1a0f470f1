"""Serving engines end to end: a predict-only server (``ftune serve``) on the shared stack's
database and store, under FTUNE_SERVE_ENGINE=auto (the default) and onnxruntime. The first
prediction of a model is answered by torch while its ONNX export is prepared and checked
against torch on the model's own images in a child process; then ONNX Runtime serves it, the
model's view says so with the parity figures, /metrics counts predictions by engine, and the
int8 download is given only where its guard passed."""

from __future__ import annotations

import io
import os
import re
import subprocess
from collections.abc import Iterator

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from ftune.processes import free_port, ftune_command, stop_process, wait_until
from ftune.testing.access import Key

pytestmark = pytest.mark.processes


def _serve(service_home, policy: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["FTUNE_SERVE_ENGINE"] = policy
    server = subprocess.Popen(ftune_command("serve", "--home", str(service_home),
                                            "--port", str(port)), env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "ftune serve")
    except BaseException:
        stop_process(server)
        raise
    return server, url


@pytest.fixture
def serve(service_home, tiny_model) -> Iterator:
    """Starts ``ftune serve`` under a policy (after the shared model exists)."""
    started: list[subprocess.Popen] = []

    def start(policy: str) -> str:
        server, url = _serve(service_home, policy)
        started.append(server)
        return url

    yield start
    for server in started:
        stop_process(server)


def _png(tiny_folder, index: int) -> bytes:
    image = io.BytesIO()
    folder = sorted(p for p in tiny_folder.iterdir() if p.is_dir())[index % 3]
    Image.open(sorted(folder.iterdir())[index]).convert("RGB").save(image, "PNG")
    return image.getvalue()


def _scores(http: httpx.Client, model_id: str, png: bytes) -> dict[str, float]:
    response = http.post(f"/v1/models/{model_id}/predict", files={"files": ("a.png", png)})
    assert response.status_code == 200, response.text
    return {p["label"]: p["score"] for p in response.json()["predictions"][0]}


def _predicted(operator: Key, url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers=operator.headers).text
    return {engine: float(n) for engine, n in re.findall(
        r'^ftune_predicted_images_total\{engine="([^"]+)"\} (\S+)$', text, re.M)}


def test_auto_serves_with_onnx_runtime_once_parity_passes(serve, access, tiny_model,
                                                          tiny_folder, service_home):
    url = serve("auto")
    model_id = tiny_model["id"]
    with access["a-admin"].client(url, timeout=120) as http:
        view = http.get(f"/v1/models/{model_id}").json()["serving"]
        if view["onnx"] is None:  # not prepared by an earlier test: torch answers first
            assert view["engine"] == "torch" and "first prediction" in view["why"]
        png = _png(tiny_folder, 1)
        first = _scores(http, model_id, png)

        def prepared() -> dict | None:
            found = http.get(f"/v1/models/{model_id}").json()["serving"]
            return found if found["onnx"] is not None else None

        view = wait_until(prepared, 240, "the serving preparation", interval_s=1)
        assert view["onnx"]["passed"], view["onnx"]["why"]
        assert view["engine"] == "onnxruntime" and view["policy"] == "auto"
        assert view["onnx"]["agreement"] == 1.0 and view["onnx"]["max_prob_diff"] <= 1e-3
        assert "val split" in view["onnx"]["why"]  # the model's own images, held out
        batch = view["onnx"]["batch"]  # measured on this host; the card says it
        assert batch["provider"] == "CPUExecutionProvider" and batch["size"] >= 1
        card = http.get(f"/v1/models/{model_id}/card").text
        assert f"Served {batch['size']} image(s) at a time" in card

        def on_onnx() -> bool:
            _scores(http, model_id, png)
            return _predicted(access["operator"], url).get("onnxruntime", 0) > 0

        wait_until(on_onnx, 60, "a prediction by ONNX Runtime", interval_s=0.5)
        again = _scores(http, model_id, png)
        assert again.keys() == first.keys()
        assert max(abs(again[k] - first[k]) for k in first) <= 1e-3
        assert http.get(f"/v1/models/{model_id}").json()["exports_bytes"] > 0
        int8 = view["int8"]
        response = http.get(f"/v1/models/{model_id}/download",
                            params={"format": "onnx-int8"})
        if int8["offered"]:
            assert response.status_code == 200
            session = ort.InferenceSession(response.content,
                                           providers=["CPUExecutionProvider"])
            batch = np.zeros((2, 3, 32, 32), dtype=np.uint8)
            assert session.run(None, {"images": batch})[0].shape == (2, 3)
        else:
            assert response.status_code == 409
            detail = response.json()["detail"]
            assert "int8 model is not offered" in detail and int8["why"] in detail


def test_forcing_onnx_runtime_prepares_on_the_first_prediction(serve, access, tiny_model,
                                                               tiny_folder):
    url = serve("onnxruntime")
    model_id = tiny_model["id"]
    with access["a-admin"].client(url, timeout=300) as http:
        _scores(http, model_id, _png(tiny_folder, 2))
        view = http.get(f"/v1/models/{model_id}").json()["serving"]
        assert view["engine"] == "onnxruntime" and view["onnx"]["passed"]
        assert _predicted(access["operator"], url) == {"onnxruntime": 1.0}


def test_a_model_evicted_while_it_waits_for_its_preparation_is_freed_then(tmp_path):
    """The background preparation holds the loaded predictor weakly: a model the cache evicts
    while another export holds the slot is freed at once, and is still prepared after."""
    import gc
    import weakref

    from ftune.models.predictor import Predictor
    from ftune.models.serving.lanes import lane_layout
    from ftune.service.db.session import Database
    from ftune.service.db.tables import TunedModel
    from ftune.service.exports import ExportSlots
    from ftune.service.serving import ServingEngines
    from ftune.service.settings import Settings
    from ftune.service.storage import Storage
    from ftune.testing.models import register_tiny_model

    model_id = "e" * 32
    home = tmp_path / "home"
    tiny = register_tiny_model(tmp_path, home, model_id, image_size=32)
    settings = Settings(home=home, serve_engine="auto")
    db = Database(settings.resolved_database_url)
    with db.session() as session:
        model = session.get(TunedModel, model_id)
        assert model is not None
        session.expunge(model)
    slots = ExportSlots(1)
    engines = ServingEngines(db, Storage(home), settings, slots)
    predictor = Predictor.load(tiny.bundle, device="cpu")
    loaded = weakref.ref(predictor)
    try:
        with slots.slot():  # another export holds the one slot: the preparation waits
            engines.attach(model, predictor, lane_layout("cpu"))
            assert predictor.engine == "torch"
            del predictor  # what the cache's eviction leaves
            gc.collect()
            assert loaded() is None
        wait_until(lambda: engines._serving_of(model_id) is not None, 180,
                   "the preparation of the evicted model")
    finally:
        db.dispose()
