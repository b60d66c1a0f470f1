"""Dataset versions through the API with a real worker: a version is its parent plus new
labelled images (labels for images of an unlabelled dataset, or an archive), immutable,
deduplicated by content, counted once per stored byte, trained on like any dataset; bad
requests are refused naming the problem and leave the parent as it was."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from PIL import Image

from ftune.testing.archives import zip_folder
from ftune.testing.realdata import balanced_indices
from tests.service.conftest import wait_for_job


@pytest.fixture(scope="module")
def pool(client, animal_arrays, tmp_path_factory) -> tuple[dict, dict[str, int]]:
    """9 real images nobody labelled, and each one's true class (by its path)."""
    images, labels = animal_arrays
    root = tmp_path_factory.mktemp("versionpool") / "data"
    truth = {}
    for i, index in enumerate(balanced_indices(labels, 3, offset=120, classes=3)):
        path = f"batch/v{i:02d}.png"
        (root / "batch").mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index]).save(root / path)
        truth[path] = int(labels[index])
    response = client.post("/v1/datasets", files={"file": ("pool.zip", zip_folder(root))},
                           data={"name": "version-pool", "kind": "unlabeled"})
    assert response.status_code == 201, response.text
    return response.json(), truth


@pytest.fixture(scope="module")
def base(client, tiny_folder) -> Iterator[dict]:
    """A labelled dataset of this module's own (versions keep a parent from deletion);
    removed with its versions afterwards, so later modules' uploads of the same images
    are not deduplicated to it."""
    response = client.post("/v1/datasets", files={"file": ("base.zip", zip_folder(tiny_folder))},
                           data={"name": "versioned"}, params={"dedupe": "false"})
    assert response.status_code == 201, response.text
    yield response.json()
    _delete_with_versions(client, response.json()["id"])


def _delete_with_versions(client, root_id: str) -> None:
    """Newest first: a version's children are always newer than it, so leaves go first."""
    listed = client.get("/v1/datasets", params={"limit": 200}).json()["items"]
    parents = {d["id"]: d["parent_id"] for d in listed}

    def descends(dataset_id: str | None) -> bool:
        while dataset_id is not None and dataset_id != root_id:
            dataset_id = parents.get(dataset_id)
        return dataset_id == root_id

    for dataset in listed:
        if descends(dataset["id"]):
            deleted = client.delete(f"/v1/datasets/{dataset['id']}")
            assert deleted.status_code == 204, deleted.text


def test_labels_for_unlabelled_images_make_a_version_that_trains(client, base, pool):
    unlabeled, truth = pool
    parent = client.get(f"/v1/datasets/{base['id']}").json()
    labels = {path: f"animal{c}" for path, c in truth.items()}
    made = client.post(f"/v1/datasets/{parent['id']}/versions",
                       json={"unlabeled_dataset_id": unlabeled["id"], "labels": labels})
    assert made.status_code == 201, made.text
    version = made.json()
    assert version["parent_id"] == parent["id"] and version["version"] == parent["version"] + 1
    assert version["num_images"] == parent["num_images"] + 9
    assert version["added"]["images"] == 9 and version["added"]["from"] == "unlabeled_dataset"
    assert version["report"]["changes"]["by_class"] == {"animal0": 3, "animal1": 3,
                                                        "animal2": 3}
    # Only what it adds is stored, and counted (usage sums size_bytes).
    assert 0 < version["size_bytes"] < parent["size_bytes"]
    assert client.get(f"/v1/datasets/{parent['id']}").json() == parent  # unchanged
    again = client.post(f"/v1/datasets/{version['id']}/versions",
                        json={"unlabeled_dataset_id": unlabeled["id"], "labels": labels})
    assert again.status_code == 422 and "nothing new" in again.json()["detail"]
    job = client.post("/v1/jobs", json={"dataset_id": version["id"], "spec": {
        "image_size": 32, "epochs": 1, "batch_size": 12, "preset": "fast"}}).json()
    done = wait_for_job(client, job["id"], timeout_s=180)
    assert done["status"] == "succeeded", done["error"]
    card = client.get(f"/v1/models/{done['model_id']}/card").text
    assert f"version {version['version']}, made from dataset {parent['id']}" in card
    refused = client.delete(f"/v1/datasets/{parent['id']}")
    assert refused.status_code == 409 and "version" in refused.json()["detail"]


def test_an_archive_of_new_labelled_images_makes_a_version(client, base, tmp_path,
                                                          animal_arrays):
    images, labels = animal_arrays
    root = tmp_path / "new"
    for i, index in enumerate(balanced_indices(labels, 2, offset=140, classes=2)):
        folder = root / f"animal{int(labels[index])}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index]).save(folder / f"a{i}.png")
    made = client.post(f"/v1/datasets/{base['id']}/versions",
                       files={"file": ("new.zip", zip_folder(root))})
    assert made.status_code == 201, made.text
    version = made.json()
    assert version["added"]["from"] == "archive" and version["added"]["images"] == 4
    assert version["num_images"] == base["num_images"] + 4


def test_a_dataset_serves_its_images_and_nothing_else(client, pool):
    unlabeled, truth = pool
    path = next(iter(truth))
    shown = client.get(f"/v1/datasets/{unlabeled['id']}/images/{path}")
    assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"
    assert shown.content.startswith(b"\x89PNG")
    for bad in ("batch/none.png", "../../ftune.db", "batch/%2e%2e/%2e%2e/x.png", "batch"):
        assert client.get(f"/v1/datasets/{unlabeled['id']}/images/{bad}").status_code == 404


def test_bad_version_requests_are_refused_naming_the_problem(client, base, pool):
    unlabeled, truth = pool
    url = f"/v1/datasets/{base['id']}/versions"
    path = next(iter(truth))
    for labels, words in (({"batch/nope.png": "animal0"}, "not images of dataset"),
                          ({"../etc/passwd": "animal0"}, "not images of dataset"),
                          ({path: "../animal0"}, "cannot name a class"),
                          ({path: "bad\x00name"}, "cannot name a class"),
                          ({"batch/\x00.png": "animal0"}, "not images of dataset"),
                          ({path: ["animal0", "animal1"]}, "one label")):
        answer = client.post(url, json={"unlabeled_dataset_id": unlabeled["id"],
                                        "labels": labels})
        assert answer.status_code == 422, (labels, answer.text)
        assert words in answer.json()["detail"], answer.json()["detail"]
    labelled_as_pool = client.post(url, json={"unlabeled_dataset_id": base["id"],
                                              "labels": {path: "animal0"}})
    assert labelled_as_pool.status_code == 422
    assert "unlabeled_dataset_id" in labelled_as_pool.json()["detail"]
    assert client.post(url, json={"unlabeled_dataset_id": unlabeled["id"],
                                  "labels": {}}).status_code == 422
    assert client.post(url, content=b"labels", headers={
        "Content-Type": "text/plain"}).status_code == 415
    of_pool = client.post(f"/v1/datasets/{unlabeled['id']}/versions",
                          json={"unlabeled_dataset_id": unlabeled["id"],
                                "labels": {path: "animal0"}})
    assert of_pool.status_code == 422 and "unlabelled images" in of_pool.json()["detail"]
    assert client.get(f"/v1/datasets/{base['id']}").json()["num_images"] == \
        base["num_images"]
