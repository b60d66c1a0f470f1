"""Jobs under fire: 40 small jobs submitted as fast as possible to 2 workers while one worker
is killed (SIGKILL) and restarted twice. Prints submitted / succeeded / failed / lost /
duplicates (targets: lost = 0, duplicates = 0) and the API's p50/p99 latency for
GET /v1/jobs/{id} measured during the run."""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from ftune.processes import Child, Stack, wait_until
from ftune.service.auth.principal import Role
from ftune.testing.access import Key, make_key
from ftune.testing.archives import zip_folder
from ftune.testing.realdata import animal_mnist_arrays, balanced_indices, write_image_folder

SPEC = {"image_size": 32, "epochs": 1, "batch_size": 12}
TERMINAL = {"succeeded", "failed", "cancelled"}
ENV = {"FTUNE_WORKER_HEARTBEAT_S": "0.5", "FTUNE_JOB_STALE_S": "3",
       "FTUNE_RECONCILE_INTERVAL_S": "1", "FTUNE_RATE_JOBS": "100000/minute"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=40)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ftune-lifecycle-"))
    images, labels = animal_mnist_arrays()
    idx = balanced_indices(labels, 12, classes=3)
    folder = write_image_folder(work / "data", images[idx], labels[idx])
    with Stack(work / "home", env=ENV, log_dir=work / "logs") as stack:
        stack.start_redis(password="bench")
        url = stack.start_api()
        key = make_key(f"sqlite:///{stack.home / 'ftune.db'}", role=Role.ADMIN)
        run(stack, url, key, folder, args.jobs)


def run(stack: Stack, url: str, key: Key, folder: Path, n_jobs: int) -> None:
    victim = stack.start_worker("victim-0@bench")
    stack.start_worker("steady@bench")
    http = key.client(url, timeout=60)
    dataset = http.post("/v1/datasets", files={"file": ("t.zip", zip_folder(folder))}).json()

    job_ids: list[str] = []  # grows as jobs are submitted; the poller picks from it
    poller = LatencyPoller(key, url, job_ids)
    begun = time.perf_counter()
    submit(http, dataset["id"], n_jobs, job_ids)
    submit_s = time.perf_counter() - begun
    kill_victim_twice(stack, http, victim)
    wait_all_ended(http, job_ids, timeout_s=900)
    elapsed = time.perf_counter() - begun
    latencies = poller.stop()
    report(http, job_ids, latencies, submit_s, elapsed)


class LatencyPoller:
    """From now until ``stop``: GET a random submitted job every 20 ms on a thread, timing
    each answer (the API's latency while workers die under it)."""

    def __init__(self, key: Key, url: str, job_ids: list[str]) -> None:
        self.key, self.url, self.job_ids = key, url, job_ids
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        with self.key.client(self.url, timeout=60) as poller:
            while not self._stop.is_set():
                if self.job_ids:
                    started = time.perf_counter()
                    poller.get(f"/v1/jobs/{random.choice(self.job_ids)}")
                    self.latencies.append((time.perf_counter() - started) * 1000)
                time.sleep(0.02)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return self.latencies


def submit(http: httpx.Client, dataset_id: str, n_jobs: int, job_ids: list[str]) -> None:
    """Submit as fast as the API answers, adding each id to ``job_ids`` as it comes."""
    for _ in range(n_jobs):
        response = http.post("/v1/jobs", json={"dataset_id": dataset_id, "spec": SPEC})
        job_ids.append(response.json()["id"])


def kill_victim_twice(stack: Stack, http: httpx.Client, victim: Child) -> None:
    for round_ in range(2):  # kill the busy worker mid-job, then bring a new one up
        wait_until(lambda: http.get("/v1/jobs", params={"status": "running"}).json()["items"], 60,
                   "a job")
        time.sleep(1.0)
        stack.kill(victim)
        time.sleep(2.0)
        victim = stack.start_worker(f"victim-{round_ + 1}@bench")


def wait_all_ended(http: httpx.Client, job_ids: list[str], timeout_s: float) -> None:
    """Until every job has ended, or ``timeout_s`` (the report then counts the rest lost)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        statuses = [http.get(f"/v1/jobs/{j}").json()["status"] for j in job_ids]
        if all(s in TERMINAL for s in statuses):
            break
        time.sleep(1)


def report(http: httpx.Client, job_ids: list[str], latencies: list[float], submit_s: float,
           elapsed: float) -> None:
    jobs = [http.get(f"/v1/jobs/{j}").json() for j in job_ids]
    models = http.get("/v1/models", params={"limit": 1000}).json()["items"]
    per_job = {j["id"]: 0 for j in jobs}
    for model in models:
        per_job[model["job_id"]] = per_job.get(model["job_id"], 0) + 1
    succeeded = sum(j["status"] == "succeeded" for j in jobs)
    failed = sum(j["status"] == "failed" for j in jobs)
    lost = sum(j["status"] not in TERMINAL for j in jobs)
    duplicates = sum(n > 1 for n in per_job.values())
    resumed = sum(j["attempts"] > 1 for j in jobs)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(f"lifecycle submitted={len(jobs)} succeeded={succeeded} failed={failed} lost={lost} "
          f"duplicates={duplicates} redelivered={resumed} worker_kills=2 workers=2 "
          f"submit_s={submit_s:.2f} total_s={elapsed:.1f}")
    print(f"get_job_latency p50_ms={statistics.median(latencies):.1f} p99_ms={p99:.1f} "
          f"samples={len(latencies)}")
    if failed:
        print("failures:", {j["id"][:8]: j["error"] for j in jobs if j["status"] == "failed"})


if __name__ == "__main__":
    main()
