"""The job lifecycle with real processes killed: workers (SIGKILL), Redis (restarted empty),
the API. A stack of its own, so these tests can break it without touching the others."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import time
from collections.abc import Iterator

import httpx
import pytest
import redis
from PIL import Image

from ftune.processes import Child, Stack, wait_until
from ftune.service.auth.principal import Role
from ftune.testing.access import Key, make_key
from ftune.testing.archives import zip_folder
from ftune.testing.blobs import local_blob
from ftune.testing.realdata import balanced_indices
from ftune.testing.sse import read_events
from tests.service.conftest import wait_for_job

QUICK = {"image_size": 32, "epochs": 1, "batch_size": 12, "preset": "fast"}
# Long enough to be caught mid-run: every layer trains, a few seconds an epoch.
SLOW = {"image_size": 64, "epochs": 8, "batch_size": 6, "seed": 5,
        "freeze": {"strategy": "none"}, "early_stopping": {"patience": 100}}
ENV = {"FTUNE_CANCEL_POLL_S": "0.2", "FTUNE_PROGRESS_INTERVAL_S": "0.2",
       "FTUNE_WORKER_HEARTBEAT_S": "0.5",
       "FTUNE_JOB_STALE_S": "3", "FTUNE_RECONCILE_INTERVAL_S": "1",
       "FTUNE_RETRY_BACKOFF_S": "0.5", "FTUNE_DISPATCH_INTERVAL_S": "0.5",
       "FTUNE_RATE_JOBS": "100000/minute", "FTUNE_RATE_UPLOADS": "100000/minute"}
# Contrastive pretraining on the tiny set's unlabelled images, long enough to be caught.
PRETRAIN = {"preset": "fast", "image_size": 64, "epochs": 2, "batch_size": 12, "seed": 3,
            "pretrain": {"method": "contrastive", "epochs": 6, "batch_size": 16}}
# Two pseudo-labelling rounds after two epochs, every layer training: each round's two
# epochs take seconds, long enough to be caught in one.
ROUNDS = {**SLOW, "image_size": 32, "batch_size": 12, "epochs": 2,
          "pseudo_labels": {"rounds": 2, "threshold": 0.2}}
REDIS_PASSWORD = "lifecycle-password"


class Lifecycle(Stack):
    """The harness's stack, with the moves these tests make on it."""

    key: Key | None = None

    def client(self) -> httpx.Client:
        assert self.key is not None and self.api_url is not None
        return self.key.client(self.api_url, timeout=60)

    def worker(self, name: str) -> Child:
        return self.start_worker(f"{name}@test")

    def stop_workers(self) -> None:
        self.stop("worker", 60)

    def restart_redis_empty(self) -> None:
        port = self.redis_port
        self.kill(self.named("redis")[0])
        self.start_redis(port, password=REDIS_PASSWORD)  # no append-only file: messages gone

    def restart_api(self) -> None:
        self.stop("api")
        time.sleep(1)
        self.start_api()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Lifecycle]:
    home = tmp_path_factory.mktemp("lifecycle")
    with Lifecycle(home, env=ENV, log_dir=home) as lifecycle:
        lifecycle.start_redis(password=REDIS_PASSWORD)
        lifecycle.start_api()
        lifecycle.key = make_key(f"sqlite:///{home / 'ftune.db'}", role=Role.ADMIN)
        yield lifecycle


@pytest.fixture(scope="module")
def dataset_id(stack, tiny_folder) -> str:
    with stack.client() as http:
        response = http.post("/v1/datasets", files={"file": ("t.zip", zip_folder(tiny_folder))})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture(scope="module")
def with_unlabeled_id(stack, tiny_folder, animal_arrays, tmp_path_factory) -> str:
    """The tiny set with 60 unlabelled images beside its classes."""
    root = tmp_path_factory.mktemp("lifecycle-unlabeled") / "data"
    shutil.copytree(tiny_folder, root)
    images, labels = animal_arrays
    (root / "unlabeled").mkdir()
    for i, image in enumerate(images[balanced_indices(labels, 20, offset=40, classes=3)]):
        Image.fromarray(image).save(root / "unlabeled" / f"u{i:03d}.png")
    with stack.client() as http:
        response = http.post("/v1/datasets", files={"file": ("u.zip", zip_folder(root))})
    assert response.status_code == 201, response.text
    assert response.json()["splits"]["unlabeled"] == 60
    return response.json()["id"]


def _pretrain_epochs(home, job_id: str, kind: str = "pretrain") -> list[int]:
    """The pretraining epochs (or another ``kind``'s) recorded so far, in order (read from
    the job's events)."""
    with sqlite3.connect(home / "ftune.db") as db:
        rows = db.execute("SELECT data FROM job_events WHERE job_id = ? AND kind = ? "
                          "ORDER BY id", (job_id, kind)).fetchall()
    return [json.loads(data)["epoch"] for (data,) in rows]


def _submit(http: httpx.Client, dataset_id: str, spec: dict, **extra) -> dict:
    response = http.post("/v1/jobs", json={"dataset_id": dataset_id, "spec": spec, **extra})
    assert response.status_code == 202, response.text
    return response.json()


def _events(http: httpx.Client, job_id: str, last_event_id: int | None = None) -> list[dict]:
    return read_events(http, f"/v1/jobs/{job_id}/events", last_event_id)


def test_idempotency_key_returns_the_same_job(stack, dataset_id):
    body = {"dataset_id": dataset_id, "spec": QUICK, "priority": 1}
    with stack.client() as http:
        first = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
        again = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"]
        other = http.post("/v1/jobs", json={**body, "priority": 2},
                          headers={"Idempotency-Key": "k-1"})
        assert other.status_code == 409 and "different request body" in other.json()["detail"]
        http.post(f"/v1/jobs/{first.json()['id']}/cancel")


def test_priority_order_and_queue_position(stack, dataset_id):
    with stack.client() as http:  # no worker yet: everything waits
        jobs = [_submit(http, dataset_id, QUICK, priority=p) for p in (5, 5, 9, 0)]
        positions = [http.get(f"/v1/jobs/{j['id']}").json()["queue_position"] for j in jobs]
        assert positions == [2, 3, 1, 4]
        stack.worker("prio")
        try:
            done = [wait_for_job(http, j["id"], timeout_s=120) for j in jobs]
        finally:
            stack.stop_workers()
    assert all(j["status"] == "succeeded" for j in done), [j["error"] for j in done]
    started = [j["started_at"] for j in done]
    assert started[2] < started[0] < started[1] < started[3]  # 9 first, FIFO within 5, 0 last
    assert all(j["queue_position"] is None for j in done)


def test_sse_streams_the_whole_job_and_resumes_from_last_event_id(stack, dataset_id):
    spec = {"image_size": 48, "epochs": 3, "batch_size": 4, "freeze": {"strategy": "none"}}
    with stack.client() as http:
        job = _submit(http, dataset_id, spec)
        stack.worker("sse")
        try:
            events = _events(http, job["id"])
        finally:
            stack.stop_workers()
        kinds = [e["event"] for e in events]
        statuses = [e["data"]["status"] for e in events if e["event"] == "status"]
        assert statuses == ["queued", "running", "succeeded"]
        assert [e["data"]["epoch"] for e in events if e["event"] == "epoch"] == [1, 2, 3]
        assert "progress" in kinds and kinds[-1] == "status"
        ids = [int(e["id"]) for e in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        resumed = _events(http, job["id"], last_event_id=ids[2])
        assert [int(e["id"]) for e in resumed] == ids[3:]
        assert http.get("/v1/jobs/0123456789abcdef0123456789abcdef/events").status_code == 404


def test_a_worker_killed_mid_epoch_is_replaced_and_the_job_resumes(stack, dataset_id):
    with stack.client() as http:
        job = _submit(http, dataset_id, SLOW)
        victim = stack.worker("victim")
        wait_until(lambda: len(http.get(f"/v1/jobs/{job['id']}").json()["metrics"]) >= 2, 180,
                   "two finished epochs")
        before = http.get(f"/v1/jobs/{job['id']}").json()["metrics"]
        stack.kill(victim)  # SIGKILL: no chance to hand the job back
        stack.worker("rescuer")
        try:
            done = wait_for_job(http, job["id"], timeout_s=300)
            # The same job again, never interrupted, for comparison.
            twin = wait_for_job(http, _submit(http, dataset_id, SLOW)["id"], timeout_s=300)
        finally:
            stack.stop_workers()
        assert done["status"] == "succeeded", done["error"]
        assert [row["epoch"] for row in done["metrics"]] == list(range(1, 9))  # each once
        assert done["metrics"][: len(before)] == before  # resumed, not restarted
        assert done["attempts"] == 2
        # As good as an uninterrupted run: the same losses epoch by epoch.
        for resumed, straight in zip(done["metrics"], twin["metrics"], strict=True):
            assert resumed["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-4)
            assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-4)
        assert done["best"] == twin["best"]
        events = _events(http, job["id"])
        requeued = [e for e in events if e["event"] == "status" and e["data"]["status"] == "queued"
                    and "heartbeats" in e["data"].get("reason", "")]
        assert len(requeued) == 1


def test_pretraining_in_a_killed_worker_resumes_from_its_last_epoch(stack, with_unlabeled_id):
    with stack.client() as http:
        job = _submit(http, with_unlabeled_id, PRETRAIN)
        victim = stack.worker("pretrain-victim")
        wait_until(lambda: _pretrain_epochs(stack.home, job["id"]), 180, "a pretraining epoch")
        stack.kill(victim)  # SIGKILL in the middle of pretraining
        before = _pretrain_epochs(stack.home, job["id"])
        stack.worker("pretrain-rescuer")
        try:
            done = wait_for_job(http, job["id"], timeout_s=300)
        finally:
            stack.stop_workers()
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2 and 1 <= len(before) < 6
    # Each pretraining epoch ran once: the rescuer went on from the checkpoint.
    assert _pretrain_epochs(stack.home, job["id"]) == [1, 2, 3, 4, 5, 6]
    pretrain = done["resolved"]["pretrain"]
    assert pretrain["value"] == "contrastive" and len(pretrain["loss"]) == 6
    assert pretrain["unlabeled_images"] == 60 and pretrain["reused"] is False


def _in_first_round(http: httpx.Client, job_id: str) -> bool:
    """The job has recorded an epoch of its first pseudo-labelling round."""
    job = http.get(f"/v1/jobs/{job_id}").json()
    rounds = (job["resolved"] or {}).get("pseudo_labels", {}).get("value") or []
    return bool(rounds) and len(job["metrics"]) >= rounds[0]["first_epoch"]


def test_pseudo_label_rounds_in_a_killed_worker_are_not_repeated(stack, with_unlabeled_id):
    with stack.client() as http:
        job = _submit(http, with_unlabeled_id, ROUNDS)
        victim = stack.worker("rounds-victim")
        wait_until(lambda: _in_first_round(http, job["id"]), 300, "an epoch of round 1")
        stack.kill(victim)  # SIGKILL within the first round
        before = http.get(f"/v1/jobs/{job['id']}").json()["metrics"]
        stack.worker("rounds-rescuer")
        try:
            done = wait_for_job(http, job["id"], timeout_s=300)
        finally:
            stack.stop_workers()
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2 and done["metrics"][: len(before)] == before
    rounds = done["resolved"]["pseudo_labels"]["value"]
    assert [r["round"] for r in rounds] == [1, 2] and rounds[1]["first_epoch"] == 5
    # Each epoch ran once: the rescuer went on within round 1 from its checkpoint.
    epochs = list(range(1, 7))
    assert [row["epoch"] for row in done["metrics"]] == epochs
    assert _pretrain_epochs(stack.home, job["id"], kind="epoch") == epochs


def test_redis_restarted_empty_loses_no_job(stack, dataset_id):
    with stack.client() as http:
        # An admitted job has a message in Redis: a worker is free (but frozen) when it is
        # submitted, so the dispatcher hands it to the broker at once.
        frozen = stack.worker("frozen")
        # Frozen once its start-up dispatch is over: frozen while holding the dispatcher's
        # lock, it would keep the API from admitting anything for the lock's 30 s.
        stack.wait(lambda: "start-up upkeep done" in (stack.log_dir / "worker-frozen@test.log")
                   .read_text(errors="replace"), 60, "the frozen worker's start-up upkeep")
        frozen.process.send_signal(signal.SIGSTOP)
        admitted = _submit(http, dataset_id, QUICK)
        assert http.get(f"/v1/jobs/{admitted['id']}").json()["status"] == "admitted"
        # Queued jobs wait in the database, not in Redis: nothing of theirs can be lost.
        waiting = [_submit(http, dataset_id, QUICK) for _ in range(2)]  # the worker is taken
        assert {http.get(f"/v1/jobs/{j['id']}").json()["status"] for j in waiting} == {"queued"}
        stack.restart_redis_empty()
        assert redis.Redis.from_url(stack.redis_url).dbsize() == 0
        stack.kill(frozen)
        stack.worker("after-redis")
        try:
            done = [wait_for_job(http, j["id"], timeout_s=120) for j in [admitted, *waiting]]
        finally:
            stack.stop_workers()
        assert [j["status"] for j in done] == ["succeeded"] * 3
        recovered = [e["data"] for e in _events(http, admitted["id"])
                     if e["event"] in ("note", "status")]
        assert any("missing from the broker" in d.get("message", "")
                   or "no worker started it" in d.get("reason", "") for d in recovered)


def test_two_workers_run_every_job_exactly_once(stack, dataset_id):
    with stack.client() as http:
        jobs = [_submit(http, dataset_id, QUICK) for _ in range(6)]
        stack.worker("pair-a")
        stack.worker("pair-b")
        try:
            done = [wait_for_job(http, j["id"], timeout_s=180) for j in jobs]
        finally:
            stack.stop_workers()
        assert all(j["status"] == "succeeded" and j["attempts"] == 1 for j in done)
        for job in done:
            running = [e for e in _events(http, job["id"])
                       if e["event"] == "status" and e["data"]["status"] == "running"]
            assert len(running) == 1


def test_a_job_over_its_run_time_fails_clearly(stack, dataset_id):
    with stack.client() as http:
        job = _submit(http, dataset_id, SLOW, max_runtime_s=2)
        stack.worker("timer")
        try:
            done = wait_for_job(http, job["id"], timeout_s=120)
        finally:
            stack.stop_workers()
    assert done["status"] == "failed" and "maximum run time of 2 s" in done["error"]
    stored = local_blob(stack.home, f"jobs/{job['id']}")
    assert not (stored / "checkpoints").exists() and (stored / "logs").is_dir()  # log stays


def test_jobs_carry_on_while_the_api_restarts(stack, dataset_id):
    with stack.client() as http:
        job = _submit(http, dataset_id, {**SLOW, "epochs": 3})
    stack.worker("steady")
    try:
        with stack.client() as http:
            wait_until(lambda: http.get(f"/v1/jobs/{job['id']}").json()["status"] == "running",
                       120, "the job to start")
        stack.restart_api()
        with stack.client() as http:
            done = wait_for_job(http, job["id"], timeout_s=300)
    finally:
        stack.stop_workers()
    assert done["status"] == "succeeded" and done["attempts"] == 1
