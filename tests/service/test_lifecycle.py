"""The job lifecycle with real processes killed: workers (SIGKILL), Redis (restarted empty),
the API. A stack of its own, so these tests can break it without touching the others."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from service.launcher import find_redis_server, free_port
from tests.archives import zip_folder
from tests.service.conftest import stop_process, wait_for_job, wait_until

QUICK = {"image_size": 32, "epochs": 1, "batch_size": 12}
# Long enough to be caught mid-run: every layer trains, a few seconds an epoch.
SLOW = {"image_size": 64, "epochs": 8, "batch_size": 6, "seed": 5,
        "freeze": {"strategy": "none"}, "early_stopping": {"patience": 100}}


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    redis_port: int
    redis_dir: Path
    redis_process: subprocess.Popen | None = None
    api_process: subprocess.Popen | None = None
    api_url: str = ""
    workers: list[subprocess.Popen] = field(default_factory=list)

    def start_redis(self) -> None:
        self.redis_process = subprocess.Popen(
            [find_redis_server(), "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.redis_dir)],
            stdout=subprocess.DEVNULL)
        wait_until(redis.Redis(port=self.redis_port).ping, 20, "Redis")

    def kill_redis(self) -> None:
        assert self.redis_process is not None
        self.redis_process.kill()
        self.redis_process.wait()

    def start_api(self) -> None:
        port = free_port()
        self.api_process = self._spawn(["api", "--port", str(port)], "api.log")
        self.api_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{self.api_url}/healthz").status_code == 200, 60, "API")

    def start_worker(self, name: str) -> subprocess.Popen:
        worker = self._spawn(["worker", "--name", f"{name}@test"], f"{name}.log")
        self.workers.append(worker)
        client = redis.Redis(port=self.redis_port)
        wait_until(lambda: client.exists(f"ftune:worker:{name}@test"), 60, f"worker {name}")
        return worker

    def stop_workers(self) -> None:
        for worker in self.workers:
            stop_process(worker, 60)
        self.workers.clear()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, timeout=60)

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        with open(self.home / log, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "service.cli", *args], env=self.env,
                                    stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("lifecycle")
    port = free_port()
    env = {**os.environ, "FTUNE_HOME": str(home), "REDIS_URL": f"redis://127.0.0.1:{port}/0",
           "FTUNE_CANCEL_POLL_S": "0.2", "FTUNE_WORKER_HEARTBEAT_S": "0.5",
           "FTUNE_JOB_STALE_S": "3", "FTUNE_RECONCILE_INTERVAL_S": "1",
           "FTUNE_RETRY_BACKOFF_S": "0.5", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("DATABASE_URL", None)
    (home / "redis").mkdir()
    lifecycle = Stack(home, env, port, home / "redis")
    lifecycle.start_redis()
    lifecycle.start_api()
    try:
        yield lifecycle
    finally:
        lifecycle.stop_workers()
        if lifecycle.api_process is not None:
            stop_process(lifecycle.api_process)
        if lifecycle.redis_process is not None:
            stop_process(lifecycle.redis_process)


@pytest.fixture(scope="module")
def dataset_id(stack, tiny_folder) -> str:
    with stack.client() as http:
        response = http.post("/v1/datasets", files={"file": ("t.zip", zip_folder(tiny_folder))})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _submit(http: httpx.Client, dataset_id: str, spec: dict, **extra) -> dict:
    response = http.post("/v1/jobs", json={"dataset_id": dataset_id, "spec": spec, **extra})
    assert response.status_code == 202, response.text
    return response.json()


def _events(http: httpx.Client, job_id: str, last_event_id: int | None = None) -> list[dict]:
    """Read the SSE stream to its end, as any SSE client would."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    events, current = [], {}
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                     timeout=httpx.Timeout(120, read=60)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "data" in current:
                    events.append(current)
                current = {}
            elif line.startswith(("id:", "event:", "data:")):
                key, _, value = line.partition(":")
                current[key] = json.loads(value) if key == "data" else value.strip()
    return events


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
        stack.start_worker("prio")
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
        stack.start_worker("sse")
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
        victim = stack.start_worker("victim")
        wait_until(lambda: len(http.get(f"/v1/jobs/{job['id']}").json()["metrics"]) >= 2, 180,
                   "two finished epochs")
        before = http.get(f"/v1/jobs/{job['id']}").json()["metrics"]
        victim.send_signal(signal.SIGKILL)  # no chance to hand the job back
        victim.wait()
        stack.workers.remove(victim)
        stack.start_worker("rescuer")
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


def test_redis_restarted_empty_jobs_are_enqueued_again(stack, dataset_id):
    with stack.client() as http:
        jobs = [_submit(http, dataset_id, QUICK) for _ in range(2)]  # no worker: they wait
        stack.kill_redis()
        stack.start_redis()  # empty: the messages are gone
        assert redis.Redis(port=stack.redis_port).dbsize() == 0
        stack.start_worker("after-redis")
        try:
            done = [wait_for_job(http, j["id"], timeout_s=120) for j in jobs]
        finally:
            stack.stop_workers()
        assert [j["status"] for j in done] == ["succeeded", "succeeded"]
        notes = [e for e in _events(http, jobs[0]["id"]) if e["event"] == "note"]
        assert any("missing from the broker" in e["data"]["message"] for e in notes)


def test_two_workers_run_every_job_exactly_once(stack, dataset_id):
    with stack.client() as http:
        jobs = [_submit(http, dataset_id, QUICK) for _ in range(6)]
        stack.start_worker("pair-a")
        stack.start_worker("pair-b")
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
        stack.start_worker("timer")
        try:
            done = wait_for_job(http, job["id"], timeout_s=120)
        finally:
            stack.stop_workers()
    assert done["status"] == "failed" and "maximum run time of 2 s" in done["error"]
    assert not (stack.home / "jobs" / job["id"]).exists()


def test_jobs_carry_on_while_the_api_restarts(stack, dataset_id):
    with stack.client() as http:
        job = _submit(http, dataset_id, {**SLOW, "epochs": 3})
    stack.start_worker("steady")
    try:
        with stack.client() as http:
            wait_until(lambda: http.get(f"/v1/jobs/{job['id']}").json()["status"] == "running",
                       120, "the job to start")
        stop_process(stack.api_process)
        time.sleep(1)
        stack.start_api()
        with stack.client() as http:
            done = wait_for_job(http, job["id"], timeout_s=300)
    finally:
        stack.stop_workers()
    assert done["status"] == "succeeded" and done["attempts"] == 1
