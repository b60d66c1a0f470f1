"""What a worker keeps for later jobs (the fetched dataset, its decoded images, the frozen
features) is kept per tenant: a job never shows that another tenant trained on the same
images, not in its choices (``resolved.feature_cache``), nor in its log. Sharing across
tenants is an operator's setting (tests/models/test_derived.py)."""

from __future__ import annotations

import os

import httpx
import numpy as np
import pytest

from ftune.processes import wait_until
from ftune.testing.archives import zip_folder
from ftune.testing.realdata import balanced_indices, write_image_folder
from tests.service.conftest import wait_for_job

# Head on the frozen backbone: its features are the store's entry the job reports on.
SPEC = {"preset": "fast", "image_size": 32, "epochs": 1, "batch_size": 12}


@pytest.fixture
def unseen_images(tmp_path, animal_arrays) -> bytes:
    """3 classes × 12 real images that no other test uploads (one image's top row is random),
    so no entry of them exists before this test."""
    images, labels = animal_arrays
    idx = balanced_indices(labels, 12, classes=3)
    chosen = images[idx].copy()
    row = chosen[0, 0]
    chosen[0, 0] = np.frombuffer(os.urandom(row.nbytes), np.uint8).reshape(row.shape)
    return zip_folder(write_image_folder(tmp_path / "data", chosen, labels[idx]))


def _upload(http: httpx.Client, archive: bytes) -> dict:
    response = http.post("/v1/datasets", files={"file": ("same.zip", archive)},
                         data={"name": "same-images"}, params={"dedupe": "false"})
    assert response.status_code == 201, response.text
    return response.json()


def _run(http: httpx.Client, dataset: dict) -> tuple[str, list[str]]:
    """The job's feature_cache choice and its log lines, once it has succeeded."""
    job = http.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": SPEC})
    assert job.status_code in (201, 202), job.text
    done = wait_for_job(http, job.json()["id"], timeout_s=240)
    assert done["status"] == "succeeded", done["error"]

    def logged() -> list[str] | None:  # the last lines are shipped as the run ends
        lines = http.get(f"/v1/jobs/{done['id']}/logs").json()["lines"]
        messages = [line["message"] for line in lines]
        return messages if any(m.endswith("ended: succeeded") for m in messages) else None

    messages = wait_until(logged, 30, "the job's last log lines", interval_s=0.3)
    return done["resolved"]["feature_cache"]["value"], messages


def _said(messages: list[str], text: str) -> bool:
    return any(text in m for m in messages)


@pytest.mark.processes
def test_another_tenants_job_on_the_same_images_shows_nothing_of_it(client, client_b,
                                                                    unseen_images):
    a_data, b_data = _upload(client, unseen_images), _upload(client_b, unseen_images)
    assert a_data["content_hash"] == b_data["content_hash"]  # the very same images

    cache, log = _run(client, a_data)
    assert cache == "computed" and _said(log, "decoded 36 images")

    # Team B's job is a first run: it fetches, decodes and computes its own, and says so.
    cache, log = _run(client_b, b_data)
    assert cache == "computed"
    assert _said(log, "decoded 36 images") and _said(log, "fetched datasets/")
    assert not _said(log, "reused"), log

    # Team A's own entries are still there for its next job.
    cache, log = _run(client, a_data)
    assert cache == "reused" and _said(log, "reused the decoded 36 images")
    assert not _said(log, "fetched datasets/"), log

