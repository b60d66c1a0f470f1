"""Jobs on two CPU ranks through the whole service: a worker with ``--devices 2``, a rank
killed mid-epoch, a cancel. A stack of its own, so killing its processes touches no other
test."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from ftune.processes import Stack, wait_until
from ftune.service.auth.principal import Role
from ftune.testing.access import Key, make_key
from ftune.testing.archives import zip_folder
from tests.service.conftest import wait_for_job

ENV = {"FTUNE_DEVICE": "cpu", "FTUNE_CANCEL_POLL_S": "0.2", "FTUNE_PROGRESS_INTERVAL_S": "0.2",
       "FTUNE_WORKER_HEARTBEAT_S": "0.5", "FTUNE_JOB_STALE_S": "3",
       "FTUNE_RECONCILE_INTERVAL_S": "1", "FTUNE_RETRY_BACKOFF_S": "0.5",
       "FTUNE_DISPATCH_INTERVAL_S": "0.5", "FTUNE_RATE_JOBS": "100000/minute",
       "FTUNE_RATE_UPLOADS": "100000/minute"}
# Every layer trains on 2 ranks: a few seconds an epoch, long enough to be caught mid-run.
TWO_RANKS = {"image_size": 48, "epochs": 5, "batch_size": 8, "seed": 2, "devices": 2,
             "freeze": {"strategy": "none"}, "early_stopping": {"patience": 100},
             "optimizer": {"name": "sgd", "lr": 0.01}}
REDIS_PASSWORD = "data-parallel-password"


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("data-parallel")
    with Stack(home, env=ENV, log_dir=home) as running:
        running.start_redis(password=REDIS_PASSWORD)
        running.start_api()
        running.start_worker("ranks@test", args=("--devices", "2"))
        yield running


@pytest.fixture(scope="module")
def key(stack) -> Key:
    return make_key(f"sqlite:///{stack.home / 'ftune.db'}", role=Role.ADMIN)


@pytest.fixture(scope="module")
def http(stack, key) -> Iterator[httpx.Client]:
    assert stack.api_url is not None
    with key.client(stack.api_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def dataset_id(http, tiny_folder) -> str:
    response = http.post("/v1/datasets", files={"file": ("t.zip", zip_folder(tiny_folder))})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _submit(http: httpx.Client, dataset_id: str, spec: dict) -> dict:
    response = http.post("/v1/jobs", json={"dataset_id": dataset_id, "spec": spec})
    assert response.status_code == 202, response.text
    return response.json()


def _processes(marker: bytes, within: str, *, unless: bytes | None = None) -> list[int]:
    """Processes whose command line names ``marker`` and a path ``within`` this stack's
    home (the ranks' launch file is in the job's folder there)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read()
        except OSError:
            continue
        if marker in command and within.encode() in command and (
                unless is None or unless not in command):
            found.append(int(entry))
    return found


def _ranks(stack: Stack) -> list[int]:
    """The ranks' processes (torchrun's own command line names them too)."""
    return _processes(b"ftune.models.parallel.rank_main", str(stack.home),
                      unless=b"torch.distributed.run")


def test_a_killed_rank_ends_its_group_and_the_job_resumes_from_its_checkpoint(
        stack, http, dataset_id):
    job = _submit(http, dataset_id, TWO_RANKS)
    wait_until(lambda: len(http.get(f"/v1/jobs/{job['id']}").json()["metrics"]) >= 2, 180,
               "two finished epochs")
    before = http.get(f"/v1/jobs/{job['id']}").json()["metrics"]
    ranks = _ranks(stack)
    assert len(ranks) == 2
    os.kill(max(ranks), signal.SIGKILL)  # mid-epoch: no chance to say anything
    done = wait_for_job(http, job["id"], timeout_s=300)
    assert done["status"] == "succeeded", done["error"]
    assert [row["epoch"] for row in done["metrics"]] == [1, 2, 3, 4, 5]  # each once
    assert done["metrics"][:len(before)] == before  # resumed, not restarted
    assert done["attempts"] == 2
    assert done["resolved"]["devices"]["value"] == 2
    models = http.get("/v1/models").json()["items"]
    assert [m["id"] for m in models if m["job_id"] == job["id"]] == [done["model_id"]]
    assert not _ranks(stack)


def test_cancel_of_a_two_rank_job_leaves_no_rank_behind(stack, http, dataset_id):
    job = _submit(http, dataset_id, {**TWO_RANKS, "epochs": 50})
    wait_until(lambda: http.get(f"/v1/jobs/{job['id']}").json()["progress"].get("step"),
               180, "the first steps")
    assert len(_ranks(stack)) == 2
    started = time.monotonic()
    assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code in (200, 202)
    done = wait_for_job(http, job["id"], timeout_s=60)
    assert done["status"] == "cancelled"
    assert time.monotonic() - started < 30
    assert not _ranks(stack) and not _processes(b"torch.distributed.run", str(stack.home))
