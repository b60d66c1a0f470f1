"""Upload → job → poll → download → predict, through the real API, Redis and worker."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from ftune.models.predictor import Predictor
from ftune.testing.archives import tar_folder
from tests.service.conftest import wait_for_job

E2E_SPEC = {
    "backbone": "tf_efficientnet_lite0", "image_size": 96, "epochs": 2, "batch_size": 32,
    "freeze": {"strategy": "head_only"}, "optimizer": {"name": "adam", "lr": 0.01},
    "seed": 1,
}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def test_health_reports_database_redis_and_worker(client):
    body = client.get("/healthz").json()
    assert body["status"] == "ok" and body["database"] == "ok" and body["redis"] == "ok"
    assert body["workers"] >= 1


def test_openapi_documents_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/healthz", "/v1/backbones", "/v1/datasets", "/v1/datasets/{dataset_id}",
                 "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/models",
                 "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/curves.png",
                 "/v1/datasets/{dataset_id}/report", "/v1/models/aliases/{alias}",
                 "/v1/models/{model_ref}", "/v1/models/{model_ref}/download",
                 "/v1/models/{model_ref}/predict", "/v1/models/{model_ref}/evaluation",
                 "/v1/models/{model_ref}/card", "/v1/models/{model_ref}/confusion.png"):
        assert path in paths, path
    upload = paths["/v1/datasets"]["post"]["requestBody"]["content"]
    assert "file" in upload["multipart/form-data"]["schema"]["properties"]
    assert client.get("/docs").status_code == 200


def test_backbones_lists_the_offline_registry(client):
    names = {b["name"]: b for b in client.get("/v1/backbones").json()["items"]}
    assert names["tf_efficientnet_lite0"]["pretrained_offline"] is True
    assert names["tf_efficientnet_lite0"]["input_size"] == 224


def test_fine_tune_through_the_service(client, animal_folder, animal_heldout, tmp_path,
                                       service_home):
    upload = client.post("/v1/datasets",
                         files={"file": ("animals.tar.gz", tar_folder(animal_folder))})
    assert upload.status_code == 201, upload.text
    dataset = upload.json()
    assert dataset["name"] == "animals"
    assert dataset["num_images"] == 400 and len(dataset["classes"]) == 10
    assert dataset["splits"] == {"train": 400, "val": None}
    assert client.get(f"/v1/datasets/{dataset['id']}").json()["classes"] == dataset["classes"]
    assert dataset["id"] in {d["id"] for d in client.get("/v1/datasets").json()["items"]}

    submitted = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": E2E_SPEC})
    assert submitted.status_code == 202, submitted.text
    assert submitted.json()["status"] in ("queued", "admitted")  # admitted: a worker is free
    job = wait_for_job(client, submitted.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["started_at"] and job["finished_at"] and job["created_at"] <= job["started_at"]
    assert [row["epoch"] for row in job["metrics"]] == [1, 2]
    for row in job["metrics"]:
        assert row["train_loss"] > 0 and 0 <= row["val_accuracy"] <= 1
    assert job["progress"]["epoch"] == 2 and job["progress"]["epochs"] == 2
    assert job["best"]["epoch"] in (1, 2) and job["best"]["val_accuracy"] > 0.3
    assert job["spec"]["optimizer"]["name"] == "adam" and job["spec"]["epochs"] == 2
    assert job["id"] in {j["id"] for j in client.get("/v1/jobs?status=succeeded").json()["items"]}

    model = client.get(f"/v1/models/{job['model_id']}").json()
    assert model["job_id"] == job["id"] and model["classes"] == dataset["classes"]
    assert model["backbone"] == "tf_efficientnet_lite0"
    assert model["dataset_hash"] == dataset["content_hash"] and len(dataset["content_hash"]) == 64
    assert model["metrics"]["best_epoch"] == job["best"]["epoch"]
    assert model["id"] in {m["id"] for m in client.get("/v1/models").json()["items"]}

    download = client.get(f"/v1/models/{model['id']}/download")
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        assert sorted(archive.namelist()) == ["config.json", "evaluation.json", "metrics.json",
                                              "model.safetensors"]
        archive.extractall(tmp_path / "model")
    predictor = Predictor.load(tmp_path / "model")
    images, labels = animal_heldout
    local = [p[0]["label"] for p in predictor.predict(list(images), top_k=1)]
    assert np.mean([p == t for p, t in zip(local, labels, strict=True)]) > 0.5

    # Held-out images through /predict: 5 per class, in order, with top_k respected.
    chosen = [i for c in range(10) for i in range(c * 10, c * 10 + 5)]
    files = [("files", (f"held{i}.png", _png(images[i]), "image/png")) for i in chosen]
    response = client.post(f"/v1/models/{model['id']}/predict", files=files,
                           data={"top_k": "3"})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == len(chosen)
    assert all(len(p) == 3 and p[0]["score"] >= p[1]["score"] for p in predictions)
    remote = [p[0]["label"] for p in predictions]
    accuracy = np.mean([remote[k] == labels[i] for k, i in enumerate(chosen)])
    assert accuracy > 0.5, f"held-out accuracy {accuracy:.2f} (chance is 0.10)"
    # The API and the downloaded model agree image by image.
    assert remote == [local[i] for i in chosen]
    # The model was loaded once and is kept for the next request.
    loaded = client.get("/healthz").json()["loaded_models"]
    again = client.post(f"/v1/models/{model['id']}/predict", files=files[:1]).json()
    assert again["predictions"][0][0]["label"] == remote[0]
    assert client.get("/healthz").json()["loaded_models"] == loaded >= 1
    _check_model_extras(client, model, job, dataset, [images[i] for i in chosen], remote)
    # Nothing is left in the upload area once requests finish.
    assert not any((service_home / "uploads").iterdir())


def _check_model_extras(client, model, job, dataset, images, remote_top1):
    """Evaluation, card, pictures, exports with parity, versions and aliases (issue 6)."""
    import onnxruntime as ort
    import torch

    from ftune.models.data.transforms import resize_center_crop
    from ftune.models.preprocessing import Preprocessing

    evaluation = client.get(f"/v1/models/{model['id']}/evaluation").json()
    val = evaluation["val"]
    assert val["num_images"] == 80 and len(val["confusion_matrix"]["labels"]) == 10
    assert val["accuracy"] == pytest.approx(job["best"]["val_accuracy"], abs=1e-6)
    card = client.get(f"/v1/models/{model['id']}/card?format=json").json()
    assert card["dataset"]["content_hash"] == dataset["content_hash"]
    assert card["backbone"]["pretrained_weights_from"].startswith("package")
    assert card["seed"] == 1 and len(card["training_curve"]) == 2
    assert {"torch", "timm"} <= set(card["environment"]["versions"])
    markdown = client.get(f"/v1/models/{model['id']}/card")
    assert markdown.headers["content-type"].startswith("text/markdown")
    assert "# Model card: animals v" in markdown.text and "| animal0 |" in markdown.text
    # The worst val files, explained: listed in the card, drawn in worst.png.
    worst = card["evaluation"]["val"]["worst_explained"]
    assert worst and all(w["explained"] in model["classes"] for w in worst)
    assert "## Worst files, explained" in markdown.text and worst[0]["path"] in markdown.text
    for url in (f"/v1/jobs/{job['id']}/curves.png", f"/v1/models/{model['id']}/confusion.png",
                f"/v1/models/{model['id']}/worst.png"):
        picture = client.get(url)
        assert picture.headers["content-type"] == "image/png"
        assert picture.content.startswith(b"\x89PNG")

    # Name, version and alias references.
    assert model["name"] == "animals" and model["version"] >= 1
    by_version = client.get(f"/v1/models/animals:{model['version']}").json()
    assert by_version["id"] == model["id"]
    alias = client.put("/v1/models/aliases/production", json={"model": model["id"]})
    assert alias.status_code == 200 and alias.json()["name"] == "animals"
    assert client.get("/v1/models/animals:production").json()["aliases"] == ["production"]
    assert client.get("/v1/models/animals:staging").status_code == 404
    assert client.put("/v1/models/aliases/12", json={"model": model["id"]}).status_code == 422

    # ONNX and TorchScript downloads agree with /predict (through the alias).
    prep = Preprocessing.from_dict(client.get(
        "/v1/models/animals:production/card?format=json").json()["backbone"]["preprocessing"])
    batch = torch.stack([resize_center_crop(Image.fromarray(a).convert("RGB"), prep,
                                            prep.input_size) for a in images]).numpy()
    onnx_file = client.get("/v1/models/animals:production/download?format=onnx")
    assert onnx_file.status_code == 200
    session = ort.InferenceSession(onnx_file.content, providers=["CPUExecutionProvider"])
    onnx_probs = session.run(None, {"images": batch})[0]
    labels = model["classes"]
    assert [labels[i] for i in onnx_probs.argmax(1)] == remote_top1
    script = client.get(f"/v1/models/{model['id']}/download?format=torchscript")
    scripted = torch.jit.load(io.BytesIO(script.content))
    with torch.no_grad():
        script_probs = scripted(torch.from_numpy(batch)).numpy()
    assert np.abs(script_probs - onnx_probs).max() <= 1e-4
    assert client.get(f"/v1/models/{model['id']}/download?format=tflite").status_code == 422
