"""What to label next, through the API with a real worker: a suggest job ranks a dataset of
unlabelled images with a tuned model; bad requests are refused naming the field."""

from __future__ import annotations

import pytest
from PIL import Image

from ftune.testing.archives import zip_folder
from ftune.testing.realdata import balanced_indices
from tests.service.conftest import wait_for_job


@pytest.fixture(scope="module")
def pool(client, animal_arrays, tmp_path_factory) -> dict:
    """24 real images nobody labelled, in folders of their own."""
    images, labels = animal_arrays
    root = tmp_path_factory.mktemp("suggestpool") / "data"
    for i, index in enumerate(balanced_indices(labels, 8, offset=90, classes=3)):
        folder = root / f"day{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index]).save(folder / f"s{i:03d}.png")
    response = client.post("/v1/datasets", files={"file": ("pool.zip", zip_folder(root))},
                           data={"name": "suggest-pool", "kind": "unlabeled"})
    assert response.status_code == 201, response.text
    return response.json()


def test_a_model_ranks_unlabelled_images_for_labelling_on_a_worker(client, tiny_model, pool):
    submitted = client.post(f"/v1/models/{tiny_model['id']}/suggestions",
                            json={"unlabeled_dataset_id": pool["id"], "count": 5})
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert job["kind"] == "suggest" and job["spec"]["model_id"] == tiny_model["id"]
    assert job["dataset_id"] == pool["id"] and job["suggestions"] is None
    done = wait_for_job(client, job["id"], timeout_s=120)
    assert done["status"] == "succeeded", done["error"]
    picks = done["suggestions"]
    assert len(picks) == 5 and len({p["path"] for p in picks}) == 5
    assert all(p["path"].startswith(("day0/", "day1/")) for p in picks)
    assert picks[0]["distance"] == 1.0 and picks[0]["score"] == picks[0]["uncertainty"]
    assert max(p["uncertainty"] for p in picks) == picks[0]["uncertainty"]
    assert all(p["guess"][0]["label"] in tiny_model["classes"] for p in picks)
    listed = {j["id"]: j for j in client.get("/v1/jobs").json()["items"]}
    assert listed[job["id"]]["kind"] == "suggest"


def test_bad_suggestion_requests_are_refused_naming_the_problem(client, tiny_model,
                                                                tiny_dataset, pool):
    url = f"/v1/models/{tiny_model['id']}/suggestions"
    labelled = client.post(url, json={"unlabeled_dataset_id": tiny_dataset["id"]})
    assert labelled.status_code == 422
    assert "unlabeled_dataset_id" in labelled.json()["detail"]
    assert "kind=unlabeled" in labelled.json()["detail"]
    for body in ({"unlabeled_dataset_id": pool["id"], "count": 0},
                 {"unlabeled_dataset_id": pool["id"], "count": 1001},
                 {"unlabeled_dataset_id": pool["id"], "measure": "vibes"},
                 {"unlabeled_dataset_id": pool["id"], "extra": 1}, {}):
        assert client.post(url, json=body).status_code == 422, body
    missing = client.post(f"/v1/models/{'0' * 32}/suggestions",
                          json={"unlabeled_dataset_id": pool["id"]})
    assert missing.status_code == 404
    unknown = client.post(url, json={"unlabeled_dataset_id": "0" * 32})
    assert unknown.status_code == 404
