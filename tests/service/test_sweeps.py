"""Hyperparameter sweeps on a stack of their own with two real workers: a sweep runs its
trials as jobs at most ``parallelism`` at once and reports the best; the median pruner stops
a clearly bad trial early; cancel stops everything; a worker SIGKILLed (with Redis restarted
empty and the API restarted) loses no trial and runs none twice; a bad space is a 422."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from datetime import datetime

import httpx
import pytest
from sqlalchemy import create_engine, select

from ftune.processes import Stack, wait_until
from ftune.service.auth.principal import Role
from ftune.service.db.tables import JobRun
from ftune.testing.access import Key, make_key
from ftune.testing.archives import zip_folder
from ftune.testing.sse import read_events

ENV = {"FTUNE_CANCEL_POLL_S": "0.2", "FTUNE_WORKER_HEARTBEAT_S": "0.5",
       "FTUNE_JOB_STALE_S": "3", "FTUNE_RECONCILE_INTERVAL_S": "1",
       "FTUNE_DISPATCH_INTERVAL_S": "0.5", "FTUNE_RATE_JOBS": "100000/minute",
       "FTUNE_RATE_UPLOADS": "100000/minute"}
REDIS_PASSWORD = "sweeps-password"
# Head-only trials on cached features: seconds each.
HEAD = {"image_size": 32, "batch_size": 12, "preset": "fast", "epochs": 3,
        "early_stopping": {"patience": 100}}
# Every layer trains: a few seconds an epoch, long enough to be caught mid-run.
SLOW = {"image_size": 64, "batch_size": 6, "epochs": 4, "freeze": {"strategy": "none"},
        "early_stopping": {"patience": 100}}
TERMINAL = {"succeeded", "failed", "cancelled", "pruned"}


class Sweeps(Stack):
    key: Key | None = None

    def client(self) -> httpx.Client:
        assert self.key is not None and self.api_url is not None
        return self.key.client(self.api_url, timeout=60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Sweeps]:
    home = tmp_path_factory.mktemp("sweeps")
    with Sweeps(home, env=ENV, log_dir=home) as sweeps:
        sweeps.start_redis(password=REDIS_PASSWORD)
        sweeps.start_api()
        sweeps.key = make_key(f"sqlite:///{home / 'ftune.db'}", role=Role.ADMIN)
        sweeps.start_worker("one@test")
        sweeps.start_worker("two@test")
        yield sweeps


@pytest.fixture
def http(stack) -> Iterator[httpx.Client]:
    """A client of the API as it runs now (a test restarts it on another port)."""
    with stack.client() as client:
        yield client


@pytest.fixture(scope="module")
def dataset_id(stack, tiny_folder) -> str:
    with stack.client() as http:
        response = http.post("/v1/datasets",
                             files={"file": ("t.zip", zip_folder(tiny_folder))})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _start(http: httpx.Client, dataset_id: str, **body) -> dict:
    response = http.post("/v1/sweeps", json={"dataset_id": dataset_id, **body})
    assert response.status_code == 202, response.text
    return response.json()


def _wait(http: httpx.Client, sweep_id: str, timeout_s: float = 300) -> dict:
    def ended() -> dict | None:
        sweep = http.get(f"/v1/sweeps/{sweep_id}").json()
        return sweep if sweep["status"] != "running" else None

    return wait_until(ended, timeout_s, f"sweep {sweep_id} to end", interval_s=0.5)


def _runs(stack: Stack, job_ids: list[str]) -> list[JobRun]:
    engine = create_engine(f"sqlite:///{stack.home / 'ftune.db'}")
    try:
        with engine.connect() as connection:
            return list(connection.execute(select(JobRun).where(JobRun.job_id.in_(job_ids))))
    finally:
        engine.dispose()


def _most_at_once(runs: list) -> int:
    edges = sorted([(r.started_at, 1) for r in runs] + [(r.ended_at or datetime.max, -1)
                                                         for r in runs])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_a_sweep_runs_its_trials_two_at_a_time_and_reports_the_best(stack, http, dataset_id):
    space = {"optimizer.lr": {"log_uniform": [1e-3, 1e-1]},
             "head.dropout": {"uniform": [0.0, 0.5]}, "seed": {"int": [0, 100]}}
    sweep = _start(http, dataset_id, base=HEAD, space=space, n_trials=6, parallelism=2,
                   pruner="none", sampler="tpe", seed=7)
    done = _wait(http, sweep["id"])
    assert done["status"] == "succeeded", done["reason"]
    trials = done["trials"]
    assert [t["number"] for t in trials] == list(range(6))
    assert {t["status"] for t in trials} == {"succeeded"}
    runs = _runs(stack, [t["job_id"] for t in trials])
    assert _most_at_once(runs) == 2  # parallelism, on both workers
    assert len({r.worker for r in runs}) == 2

    best = done["best_trial"]
    values = [t["value"] for t in trials]
    assert best["value"] == max(values)
    job = http.get(f"/v1/jobs/{best['job_id']}").json()
    assert job["sweep_id"] == sweep["id"]
    assert job["best"]["val_accuracy"] == best["value"]
    assert job["spec"]["optimizer"]["lr"] == best["params"]["optimizer.lr"]
    assert job["spec"]["head"]["dropout"] == best["params"]["head.dropout"]
    assert job["spec"]["seed"] == best["params"]["seed"]
    model = http.get(f"/v1/models/{best['model_id']}").json()
    assert model["job_id"] == best["job_id"]

    # Same images, size and backbone: one trial computes the features, the rest reuse them.
    caches = [http.get(f"/v1/jobs/{t['job_id']}").json()["resolved"]["feature_cache"]["value"]
              for t in trials]
    assert caches.count("computed") == 1 and caches.count("reused") == 5

    promoted = http.post(f"/v1/sweeps/{sweep['id']}/promote", json={"alias": "champion"})
    assert promoted.status_code == 200, promoted.text
    assert http.get(f"/v1/models/{promoted.json()['alias']}").json()["id"] == best["model_id"]

    plot = http.get(f"/v1/sweeps/{sweep['id']}/plot.png")
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")
    events = read_events(http, f"/v1/sweeps/{sweep['id']}/events")
    started = {e["data"]["number"] for e in events
               if e["event"] == "trial" and e["data"]["status"] == "queued"}
    assert started == set(range(6))
    assert events[-1]["event"] == "status" and events[-1]["data"]["status"] == "succeeded"


def test_the_median_pruner_stops_a_clearly_bad_trial_early(http, dataset_id):
    base = {**HEAD, "epochs": 5, "freeze": {"strategy": "head_only"}}
    space = {"optimizer.lr": {"choice": [0.01, 10.0]}, "seed": {"choice": [0, 1, 2]}}
    sweep = _start(http, dataset_id, base=base, space=space, n_trials=6, parallelism=1,
                   objective="val_loss", pruner="median", sampler="grid", seed=3)
    done = _wait(http, sweep["id"])
    pruned = [t for t in done["trials"] if t["pruned"]]
    assert pruned, done["trials"]
    assert all(t["params"]["optimizer.lr"] == 10.0 for t in pruned)
    assert all(t["epoch"] < 5 and t["status"] == "pruned" for t in pruned)
    job = http.get(f"/v1/jobs/{pruned[0]['job_id']}").json()
    assert job["status"] == "pruned" and job["model_id"] is None
    assert job["best"]["val_loss"] == pruned[0]["value"] == min(
        row["val_loss"] for row in job["metrics"])
    assert len({tuple(t["params"].values()) for t in done["trials"]}) == 6  # the whole grid
    assert done["epochs_run"] < done["epochs_asked"]


def test_cancel_stops_every_trial(http, dataset_id):
    space = {"optimizer.lr": {"log_uniform": [1e-4, 1e-3]}}
    sweep = _start(http, dataset_id, base={**SLOW, "epochs": 30}, space=space, n_trials=6,
                   parallelism=2, pruner="none")
    wait_until(lambda: sum(t["status"] == "running" for t in http.get(
        f"/v1/sweeps/{sweep['id']}").json()["trials"]) == 2, 120, "two trials running")
    cancelled = http.post(f"/v1/sweeps/{sweep['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    wait_until(lambda: all(t["status"] in TERMINAL for t in http.get(
        f"/v1/sweeps/{sweep['id']}").json()["trials"]), 60, "every trial to stop")
    time.sleep(2)  # dispatcher rounds: none may start another trial
    after = http.get(f"/v1/sweeps/{sweep['id']}").json()
    assert len(after["trials"]) == 2
    assert {t["status"] for t in after["trials"]} == {"cancelled"}
    assert http.post(f"/v1/sweeps/{sweep['id']}/cancel").status_code == 409


def test_a_sweep_survives_a_killed_worker_an_empty_redis_and_an_api_restart(
        stack, http, dataset_id):
    space = {"optimizer.lr": {"choice": [1e-4, 3e-4]}, "seed": {"choice": [0, 1]}}
    sweep = _start(http, dataset_id, base=SLOW, space=space, n_trials=4, parallelism=2,
                   pruner="none", sampler="grid")
    wait_until(lambda: any(t["epoch"] >= 1 and t["status"] == "running" for t in http.get(
        f"/v1/sweeps/{sweep['id']}").json()["trials"]), 180, "a trial mid-run")
    stack.kill(stack.named("worker")[0])  # SIGKILL: its trial is not handed back
    port = stack.redis_port
    stack.kill(stack.named("redis")[0])
    stack.start_redis(port, password=REDIS_PASSWORD)  # empty: every message is gone
    stack.stop("api")
    stack.start_api()  # on a new port
    stack.start_worker("three@test")
    with stack.client() as again:
        _check_survivors(stack, again, sweep["id"])


def _check_survivors(stack: Sweeps, http: httpx.Client, sweep_id: str) -> None:
    done = _wait(http, sweep_id, timeout_s=400)
    assert done["status"] == "succeeded", done["reason"]
    trials = done["trials"]
    assert len(trials) == 4 and {t["status"] for t in trials} == {"succeeded"}
    assert len({t["job_id"] for t in trials}) == 4
    assert sorted(tuple(sorted(t["params"].items())) for t in trials) == sorted(
        {tuple(sorted(t["params"].items())) for t in trials})  # the grid, each point once
    jobs = [http.get(f"/v1/jobs/{t['job_id']}").json() for t in trials]
    assert max(job["attempts"] for job in jobs) == 2  # the killed worker's trial resumed
    for trial, job in zip(trials, jobs, strict=True):
        assert [row["epoch"] for row in job["metrics"]] == [1, 2, 3, 4]  # each epoch once
        runs = sorted(_runs(stack, [trial["job_id"]]), key=lambda r: r.started_at)
        for earlier, later in itertools.pairwise(runs):
            assert earlier.ended_at is not None and earlier.ended_at <= later.started_at


@pytest.mark.parametrize(("space", "path"), [
    ({"optimizer.lrr": {"log_uniform": [1e-4, 1e-2]}}, "optimizer.lrr"),
    ({"optimizer": {"choice": ["adam"]}}, "optimizer"),
    ({"freeze.n_blocks": {"uniform": [1, 4]}}, "freeze.n_blocks"),
    ({"optimizer.lr": {"log_uniform": [0, 1e-2]}}, "optimizer.lr"),
    ({"head.dropout": {"uniform": [0, 2]}}, "head.dropout"),
    ({"optimizer.name": {"choice": ["adam", "lbfgs"]}}, "optimizer.name"),
    ({"image_size": {"normal": [64, 128]}}, "image_size"),
    ({"weights_path": {"choice": ["/etc/passwd"]}}, "weights_path"),
])
def test_a_bad_space_is_a_422_naming_the_path(http, dataset_id, space, path):
    response = http.post("/v1/sweeps", json={"dataset_id": dataset_id, "space": space})
    assert response.status_code == 422, response.text
    body = response.json()
    assert path in body["detail"]
    assert any(error["loc"][-1] == path for error in body["errors"])


def test_an_idempotency_key_returns_the_same_sweep_and_lists_page(http, dataset_id):
    body = {"dataset_id": dataset_id, "base": HEAD, "n_trials": 1, "pruner": "none",
            "space": {"head.dropout": {"uniform": [0, 0.5]}}}
    first = http.post("/v1/sweeps", json=body, headers={"Idempotency-Key": "s-1"})
    again = http.post("/v1/sweeps", json=body, headers={"Idempotency-Key": "s-1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = http.post("/v1/sweeps", json={**body, "n_trials": 2},
                      headers={"Idempotency-Key": "s-1"})
    assert other.status_code == 409 and "different request body" in other.json()["detail"]
    page = http.get("/v1/sweeps", params={"limit": 1}).json()
    assert [s["id"] for s in page["items"]] == [first.json()["id"]] and page["next_cursor"]
    _wait(http, first.json()["id"])


def test_a_grid_needs_discrete_parameters_and_a_sweep_needs_validation_images(http,
                                                                                  dataset_id):
    grid = http.post("/v1/sweeps", json={"dataset_id": dataset_id, "sampler": "grid",
                                         "space": {"head.dropout": {"uniform": [0, 0.5]}}})
    assert grid.status_code == 422 and "grid" in grid.json()["detail"]
    no_val = http.post("/v1/sweeps", json={"dataset_id": dataset_id, "base": {
        "val_fraction": 0}, "space": {"head.dropout": {"uniform": [0, 0.5]}}})
    assert no_val.status_code == 422 and "val_fraction" in no_val.json()["detail"]
    assert http.get("/v1/sweeps/0123456789abcdef0123456789abcdef").status_code == 404
