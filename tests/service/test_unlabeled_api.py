"""Unlabelled images through the service: uploaded in a dataset's unlabeled/ folder or as a
dataset of their own (kind=unlabeled), named by a job, refused with a 422 naming the field
when a spec needs them and there are none, and used by pretraining and pseudo-labels in the
real worker."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from ftune.testing.archives import zip_folder
from ftune.testing.realdata import balanced_indices
from tests.service.conftest import wait_for_job

SPEC = {"preset": "fast", "image_size": 32, "batch_size": 12}


def _save(folder: Path, images, prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{prefix}{i:04d}.png")


@pytest.fixture(scope="module")
def with_unlabeled(client, tiny_folder, animal_arrays, tmp_path_factory) -> dict:
    """The tiny dataset plus an unlabeled/ folder of 30 new images and one copy."""
    root = tmp_path_factory.mktemp("withunlabeled") / "data"
    shutil.copytree(tiny_folder, root)
    images, labels = animal_arrays
    _save(root / "unlabeled", images[balanced_indices(labels, 10, offset=60, classes=3)], "u")
    shutil.copy(next((root / "animal0").iterdir()), root / "unlabeled" / "copy.png")
    response = client.post("/v1/datasets", files={"file": ("u.zip", zip_folder(root))},
                           data={"name": "with-unlabeled"}, params={"dedupe": "false"})
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def unlabeled_only(client, animal_arrays, tmp_path_factory) -> dict:
    images, labels = animal_arrays
    root = tmp_path_factory.mktemp("unlabeledonly") / "data"
    _save(root / "phone" / "day1", images[balanced_indices(labels, 8, offset=80, classes=3)], "p")
    response = client.post("/v1/datasets", files={"file": ("p.zip", zip_folder(root))},
                           data={"name": "pool", "kind": "unlabeled"})
    assert response.status_code == 201, response.text
    return response.json()


def test_uploads_count_unlabelled_images(client, with_unlabeled, unlabeled_only):
    assert with_unlabeled["kind"] == "labeled" and with_unlabeled["splits"]["unlabeled"] == 30
    assert with_unlabeled["classes"] == ["animal0", "animal1", "animal2"]
    codes = {w["code"] for w in with_unlabeled["report"]["warnings"]}
    assert "unlabeled_copies" in codes
    assert unlabeled_only["kind"] == "unlabeled" and unlabeled_only["classes"] == []
    assert unlabeled_only["splits"] == {"val": None, "unlabeled": 24}
    assert client.get(f"/v1/datasets/{unlabeled_only['id']}").json()["kind"] == "unlabeled"
    bad = client.post("/v1/datasets", files={"file": ("p.zip", b"x")}, data={"kind": "maybe"})
    assert bad.status_code == 422 and "kind" in bad.json()["detail"]


def test_a_spec_needing_unlabelled_images_without_any_is_a_422_naming_the_field(
        client, tiny_dataset, with_unlabeled, unlabeled_only):
    for spec, field in (({"pretrain": {"method": "autoencoder"}}, "pretrain.method"),
                        ({"pseudo_labels": {"rounds": 1}}, "pseudo_labels.rounds")):
        response = client.post("/v1/jobs", json={"dataset_id": tiny_dataset["id"],
                                                 "spec": {**SPEC, **spec}})
        assert response.status_code == 422 and field in response.json()["detail"]
        assert response.json()["errors"][0]["loc"] == ["spec", *field.split(".")]
    cases = [({"dataset_id": unlabeled_only["id"]}, "dataset_id"),
             ({"dataset_id": tiny_dataset["id"], "unlabeled_dataset_id": with_unlabeled["id"],
               "spec": {"pretrain": {"method": "contrastive"}}}, "unlabeled_dataset_id"),
             ({"dataset_id": tiny_dataset["id"], "unlabeled_dataset_id": unlabeled_only["id"]},
              "unlabeled_dataset_id")]
    for body, field in cases:
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 422 and response.json()["detail"].startswith(field), \
            response.text


def test_a_sweep_needing_unlabelled_images_without_any_is_a_422(client, tiny_dataset,
                                                                 with_unlabeled):
    body = {"dataset_id": tiny_dataset["id"], "n_trials": 2,
            "space": {"head.dropout": {"uniform": [0.0, 0.5]}}}
    response = client.post("/v1/sweeps", json={**body, "base": {"pretrain": {
        "method": "contrastive"}}})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("base.pretrain.method"), response.text
    space = {"pretrain.method": {"choice": ["none", "autoencoder"]}}
    response = client.post("/v1/sweeps", json={**body, "space": space})
    assert response.status_code == 422 and "unlabelled" in response.json()["detail"]
    assert response.json()["errors"][0]["loc"] == ["space", "pretrain.method"]
    accepted = client.post("/v1/sweeps", json={**body, "dataset_id": with_unlabeled["id"],
                                               "space": space})
    assert accepted.status_code == 202, accepted.text
    assert client.post(f"/v1/sweeps/{accepted.json()['id']}/cancel").status_code == 200


def test_another_tenants_unlabelled_dataset_is_not_found(client_b, unlabeled_only, tiny_folder):
    own = client_b.post("/v1/datasets", files={"file": ("t.zip", zip_folder(tiny_folder))})
    response = client_b.post("/v1/jobs", json={
        "dataset_id": own.json()["id"], "unlabeled_dataset_id": unlabeled_only["id"],
        "spec": {**SPEC, "pretrain": {"method": "autoencoder"}}})
    assert response.status_code == 404


def _events(client, job_id: str) -> list[tuple[str, dict]]:
    lines = client.get(f"/v1/jobs/{job_id}/events").text.splitlines()
    kinds = [line[6:].strip() for line in lines if line.startswith("event:")]
    data = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    return list(zip(kinds, data, strict=True))


def test_pretraining_and_pseudo_labels_run_in_the_worker(client, with_unlabeled,
                                                         unlabeled_only):
    spec = {**SPEC, "pretrain": {"method": "autoencoder", "epochs": 2, "batch_size": 16},
            "pseudo_labels": {"rounds": 1, "threshold": 0.2}}
    response = client.post("/v1/jobs", json={"dataset_id": with_unlabeled["id"], "spec": spec,
                                             "unlabeled_dataset_id": unlabeled_only["id"]})
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"], timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    assert job["unlabeled_dataset_id"] == unlabeled_only["id"]
    pretrain = job["resolved"]["pretrain"]
    assert pretrain["value"] == "autoencoder" and pretrain["unlabeled_images"] == 30 + 24
    assert len(pretrain["loss"]) == 2 and pretrain["reused"] is False
    rounds = job["resolved"]["pseudo_labels"]["value"]
    assert len(rounds) == 1 and 0 < rounds[0]["images"] <= 54
    events = _events(client, job["id"])
    stages = [data["stage"] for kind, data in events if kind == "stage"]
    assert stages[:2] == ["features", "pretrain"] and "pseudo_labels" in stages
    assert [data["epoch"] for kind, data in events if kind == "pretrain"] == [1, 2]
    card = client.get(f"/v1/models/{job['model_id']}/card", params={"format": "json"}).json()
    assert card["resolved"]["pretrain"]["key"] == pretrain["key"]
    # The same job again reuses the adapted backbone instead of pretraining again.
    again = client.post("/v1/jobs", json={"dataset_id": with_unlabeled["id"],
                                          "unlabeled_dataset_id": unlabeled_only["id"],
                                          "spec": {**spec, "pseudo_labels": {"rounds": 0}}})
    again = wait_for_job(client, again.json()["id"], timeout_s=300)
    assert again["status"] == "succeeded", again["error"]
    assert again["resolved"]["pretrain"]["reused"] is True
    assert again["resolved"]["pretrain"]["key"] == pretrain["key"]
    assert not [kind for kind, _ in _events(client, again["id"]) if kind == "pretrain"]
