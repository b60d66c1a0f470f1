"""The default recipe through the service: choices made at submit and in the worker, with
their reasons, in the job view, its events and the model card; a diagnosis for every finished
job, succeeded or failed."""

from __future__ import annotations

import json

from tests.service.conftest import wait_for_job

FAST = {"preset": "fast", "image_size": 32, "epochs": 3, "batch_size": 12}


def _events(client, job_id: str) -> list[tuple[str, dict]]:
    lines = client.get(f"/v1/jobs/{job_id}/events").text.splitlines()
    kinds = [line[6:].strip() for line in lines if line.startswith("event:")]
    data = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    return list(zip(kinds, data, strict=True))


def test_choices_stages_and_diagnosis_are_in_the_job_view_events_and_card(client,
                                                                          tiny_dataset):
    response = client.post("/v1/jobs", json={"dataset_id": tiny_dataset["id"], "spec": FAST})
    assert response.status_code == 202, response.text
    submitted = response.json()
    # What the upload's statistics decide is there at once, each with its reason.
    assert submitted["resolved"]["optimizer.name"]["value"] == "adam"
    assert submitted["resolved"]["class_weights"]["value"] == "none"
    assert "image_size" not in submitted["resolved"]  # set in the spec: explicit wins
    assert submitted["spec"]["optimizer"]["lr"] == "auto" and submitted["diagnosis"] is None
    job = wait_for_job(client, submitted["id"], timeout_s=240)
    assert job["status"] == "succeeded", job["error"]
    lr = job["resolved"]["optimizer.lr"]
    assert lr["value"] > 0 and "range test" in lr["why"]
    assert job["progress"]["stage"] == "evaluate" and job["diagnosis"] == []
    assert {row["stage"] for row in job["metrics"]} == {"head"}
    events = _events(client, job["id"])
    stages = [data["stage"] for kind, data in events if kind == "stage"]
    # Val is scored, the head refit on train+val (a carved split), then test is scored.
    assert stages == ["features", "head", "evaluate", "refit", "evaluate"]
    assert job["resolved"]["refit"]["value"] is True
    resolved_events = [data for kind, data in events if kind == "resolved"]
    assert any("optimizer.lr" in data for data in resolved_events)
    card = client.get(f"/v1/models/{job['model_id']}/card").text
    assert "## Choices made for you" in card and "**optimizer.lr**" in card
    assert "## Diagnosis" in card and "looks healthy" in card
    card_json = client.get(f"/v1/models/{job['model_id']}/card", params={"format": "json"})
    assert card_json.json()["resolved"]["optimizer.lr"] == lr
    assert card_json.json()["diagnosis"] == [] and card_json.json()["lr_range_test"]


def test_a_failed_job_is_diagnosed_from_its_stored_metrics(client, tiny_dataset):
    spec = {**FAST, "freeze": {"strategy": "head_only"}, "epochs": 6,
            "optimizer": {"name": "sgd", "lr": 10.0, "momentum": 0.99},
            "early_stopping": {"patience": 20}, "oom_retry": False}
    job = client.post("/v1/jobs", json={"dataset_id": tiny_dataset["id"], "spec": spec}).json()
    job = wait_for_job(client, job["id"], timeout_s=240)
    codes = {finding["code"] for finding in job["diagnosis"]}
    assert codes & {"diverging", "unstable", "exploding_gradients"}, (job["status"],
                                                                      job["diagnosis"])
    assert all(finding["action"] for finding in job["diagnosis"])


def test_progress_totals_hold_every_stage_and_each_stage_counts_its_own_epochs(client,
                                                                              tiny_dataset):
    spec = {"image_size": 32, "epochs": 2, "batch_size": 12}  # head, then 2 of fine-tuning
    job = client.post("/v1/jobs", json={"dataset_id": tiny_dataset["id"], "spec": spec}).json()
    job = wait_for_job(client, job["id"], timeout_s=240)
    assert job["status"] == "succeeded", job["error"]
    events = [data for kind, data in _events(client, job["id"]) if kind == "stage"]
    stages = {data["stage"]: data.get("epochs") for data in events}
    own = {data["stage"]: data.get("stage_epochs") for data in events}
    head = [row for row in job["metrics"] if row["stage"] == "head"]
    # The total announced with the head stage already holds the fine-tuning epochs, so it
    # does not jump up when fine-tuning begins; it shrinks to what ran.
    assert stages["head"] == 40 + 2 and stages["finetune"] == len(head) + 2
    assert (own["head"], own["finetune"], own["evaluate"]) == (40, 2, None)
    assert job["progress"]["epochs"] == len(job["metrics"]) == job["progress"]["epochs_done"]
    assert job["progress"]["stage_epoch"] is None  # no training stage runs now


def test_a_stage_s_own_epochs_come_from_where_it_began():
    from ftune.service.db.tables import Job
    from ftune.service.jobs import progress_of

    running = Job(stage="finetune", stage_start_epoch=40, stage_epochs=12, epoch=41, step=3,
                  steps=10, epochs=55)
    shown = progress_of(running)
    assert (shown["epoch"], shown["epochs"]) == (42, 55)
    assert (shown["stage_epoch"], shown["stage_epochs"]) == (2, 12)
    between = progress_of(Job(stage="evaluate", stage_start_epoch=None, epoch=45, step=0,
                              steps=10, epochs=45))
    assert between["stage_epoch"] is None and between["stage_epochs"] is None
