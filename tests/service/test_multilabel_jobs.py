"""Multi-label datasets through the real API, Redis and worker: a job trains sigmoid outputs,
the model predicts label sets, its card and pictures show mAP, calibration and PR curves;
specs that cannot train on the dataset's task are 422s."""

from __future__ import annotations

import pytest

from ftune.testing.archives import zip_folder
from tests.service.conftest import wait_for_job

SPEC = {"image_size": 64, "epochs": 4, "batch_size": 16, "freeze": {"strategy": "head_only"},
        "optimizer": {"name": "adam", "lr": 0.003}, "seed": 3}


@pytest.fixture(scope="module")
def multilabel_dataset(client, multilabel_folder) -> dict:
    response = client.post("/v1/datasets",
                           files={"file": ("mosaics.zip", zip_folder(multilabel_folder))})
    assert response.status_code in (200, 201), response.text
    return response.json()


@pytest.fixture(scope="module")
def multilabel_model(client, multilabel_dataset) -> dict:
    submitted = client.post("/v1/jobs", json={"dataset_id": multilabel_dataset["id"],
                                              "spec": SPEC, "model_name": "mosaics"})
    assert submitted.status_code == 202, submitted.text
    job = wait_for_job(client, submitted.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    return job


def test_a_multi_label_job_reports_map_and_stores_a_multi_label_model(client, multilabel_model):
    job = multilabel_model
    assert all(row["val_map"] is not None for row in job["metrics"])
    assert job["best"]["val_map"] > 0.5
    model = client.get(f"/v1/models/{job['model_id']}").json()
    assert model["task"] == "multi_label" and model["metrics"]["calibration"]["temperature"]
    evaluation = client.get(f"/v1/models/{job['model_id']}/evaluation").json()
    assert evaluation["test"]["mean_average_precision"] > 0.5
    assert "reliability" in evaluation["test"]


def test_predictions_give_label_sets_and_every_score(client, multilabel_model,
                                                     multilabel_folder):
    images = sorted((multilabel_folder / "test").glob("*.png"))[:3]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in images]
    response = client.post(f"/v1/models/{multilabel_model['model_id']}/predict", files=files)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 3
    for entry in predictions:
        assert set(entry["labels"]) <= {"animal0", "animal1", "digit2"}
        assert [s["label"] for s in entry["scores"]] and len(entry["scores"]) == 3
        scores = [s["score"] for s in entry["scores"]]
        assert scores == sorted(scores, reverse=True)
    top1 = client.post(f"/v1/models/{multilabel_model['model_id']}/predict?top_k=1",
                       files=files).json()["predictions"]
    assert all(len(entry["scores"]) == 1 for entry in top1)


def test_card_and_pictures_of_a_multi_label_model(client, multilabel_model):
    model_id = multilabel_model["model_id"]
    card = client.get(f"/v1/models/{model_id}/card").text
    assert "| split | images | mAP |" in card and "## Calibration" in card
    assert "Decision thresholds" in card and "| class | AP |" in card
    assert "| val acc | val mAP | lr |" in card
    for picture in ("reliability.png", "pr_curves.png", "reliability.png?split=test"):
        response = client.get(f"/v1/models/{model_id}/{picture}")
        assert response.status_code == 200 and response.content[:4] == b"\x89PNG", picture
    confusion = client.get(f"/v1/models/{model_id}/confusion.png")
    assert confusion.status_code == 404 and "pr_curves.png" in confusion.text


def test_a_single_label_model_has_a_reliability_diagram_and_no_pr_curves(client, tiny_model):
    model_id = tiny_model["id"]
    assert client.get(f"/v1/models/{model_id}/reliability.png").status_code == 200
    assert client.get(f"/v1/models/{model_id}/pr_curves.png").status_code == 404
    assert client.get(f"/v1/models/{model_id}").json()["task"] == "single_label"


@pytest.mark.parametrize(("spec", "needle"), [
    ({"task": "single_label"}, "task single_label needs one label per image"),
    ({"pseudo_labels": {"rounds": 1}}, "pseudo-label is the one class"),
])
def test_specs_that_cannot_train_on_a_multi_label_dataset_are_422(client, multilabel_dataset,
                                                                  spec, needle):
    response = client.post("/v1/jobs", json={"dataset_id": multilabel_dataset["id"],
                                             "spec": {**SPEC, **spec}})
    assert response.status_code == 422 and needle in response.text


def test_val_map_is_refused_on_a_single_label_dataset(client, tiny_dataset):
    job = client.post("/v1/jobs", json={"dataset_id": tiny_dataset["id"], "spec": {
        **SPEC, "early_stopping": {"monitor": "val_map"}}})
    assert job.status_code == 422 and "val_map is for multi-label" in job.text
    sweep = client.post("/v1/sweeps", json={
        "dataset_id": tiny_dataset["id"], "base": SPEC, "objective": "val_map",
        "space": {"optimizer.lr": {"log_uniform": [1e-4, 1e-2]}}, "n_trials": 2})
    assert sweep.status_code == 422 and "val_map" in sweep.text


def test_a_sweep_ranks_multi_label_trials_by_val_map(client, multilabel_dataset):
    from ftune.processes import wait_until

    response = client.post("/v1/sweeps", json={
        "dataset_id": multilabel_dataset["id"], "base": {**SPEC, "epochs": 2},
        "objective": "val_map", "space": {"optimizer.lr": {"choice": [0.0003, 0.003]}},
        "n_trials": 2, "parallelism": 1, "pruner": "none", "sampler": "grid"})
    assert response.status_code == 202, response.text

    def ended() -> dict | None:
        sweep = client.get(f"/v1/sweeps/{response.json()['id']}").json()
        return sweep if sweep["status"] != "running" else None

    done = wait_until(ended, 300, "the sweep to end", interval_s=0.5)
    assert done["status"] == "succeeded", done["reason"]
    values = [t["value"] for t in done["trials"]]
    assert all(v is not None and 0 < v <= 1 for v in values)
    assert done["best_trial"]["value"] == max(values)
