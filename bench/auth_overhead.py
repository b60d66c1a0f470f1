"""What API keys cost: GET /v1/jobs/{id} through an API that checks keys against the same
request through one with FTUNE_AUTH=off, both processes on the same database and Redis, the
samples interleaved so machine noise hits both alike. Target: at most +1 ms at p50.

Then the fair-share start order with one worker: tenant A submits 6 jobs, then tenant B 1.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from ftune.processes import Stack
from ftune.service.auth.principal import Role
from ftune.testing.access import make_key
from ftune.testing.archives import zip_folder
from ftune.testing.realdata import animal_mnist_arrays, balanced_indices, write_image_folder

ENV = {"FTUNE_RATE_JOBS": "100000/minute", "FTUNE_RATE_UPLOADS": "100000/minute",
       "FTUNE_WORKER_HEARTBEAT_S": "0.5"}
QUICK = {"image_size": 32, "epochs": 1, "batch_size": 12}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def measure(secured: httpx.Client, open_: httpx.Client, job_id: str, n: int) -> None:
    path = f"/v1/jobs/{job_id}"
    for http in (secured, open_):  # warm both: connections, caches, the key lookup
        for _ in range(50):
            http.get(path).raise_for_status()
    timings: dict[str, list[float]] = {"auth": [], "off": []}
    for i in range(n):
        for name, http in (("auth", secured), ("off", open_))[:: 1 if i % 2 else -1]:
            started = time.perf_counter()
            http.get(path).raise_for_status()
            timings[name].append((time.perf_counter() - started) * 1000)
    p50 = {k: statistics.median(v) for k, v in timings.items()}
    p99 = {k: percentile(v, 0.99) for k, v in timings.items()}
    print(f"auth_overhead get_job auth_p50_ms={p50['auth']:.2f} off_p50_ms={p50['off']:.2f} "
          f"overhead_p50_ms={p50['auth'] - p50['off']:.2f} auth_p99_ms={p99['auth']:.2f} "
          f"off_p99_ms={p99['off']:.2f} overhead_p99_ms={p99['auth'] - p99['off']:.2f} "
          f"target_overhead_p50_ms=1.0 samples={n}")


def fair_share(stack: Stack, url: str, folder: Path) -> None:
    database = f"sqlite:///{stack.home / 'ftune.db'}"
    a = make_key(database, role=Role.ADMIN, tenant="tenant-a").client(url, timeout=60)
    b = make_key(database, role=Role.ADMIN, tenant="tenant-b").client(url, timeout=60)
    archive = zip_folder(folder)
    data_a = a.post("/v1/datasets", files={"file": ("a.zip", archive)}).json()["id"]
    data_b = b.post("/v1/datasets", files={"file": ("b.zip", archive)}).json()["id"]
    jobs = [("A", a, a.post("/v1/jobs", json={"dataset_id": data_a, "spec": QUICK}).json())
            for _ in range(6)]
    jobs.append(("B", b, b.post("/v1/jobs", json={"dataset_id": data_b, "spec": QUICK}).json()))
    deadline = time.monotonic() + 600
    done: list[tuple[str, dict]] = []
    while time.monotonic() < deadline and len(done) < len(jobs):
        done = [(n, v) for n, http, j in jobs
                if (v := http.get(f"/v1/jobs/{j['id']}").json())["status"] == "succeeded"]
        time.sleep(0.5)
    order = [name for name, view in sorted(done, key=lambda d: d[1]["started_at"])]
    print(f"fair_share start_order={''.join(order)} (one worker; A submitted 6 jobs, then B 1; "
          f"B started at place {order.index('B') + 1})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftune-auth-"))
    images, labels = animal_mnist_arrays()
    idx = balanced_indices(labels, 12, classes=3)
    folder = write_image_folder(work / "data", images[idx], labels[idx])
    with Stack(work / "home", env=ENV, log_dir=work / "logs") as stack:
        stack.start_redis(password="bench")
        secured_url = stack.start_api()
        open_url = stack.start_api(env={"FTUNE_AUTH": "off"})
        key = make_key(f"sqlite:///{stack.home / 'ftune.db'}", role=Role.ADMIN)
        with key.client(secured_url) as secured, httpx.Client(base_url=open_url) as open_:
            dataset = secured.post("/v1/datasets",
                                   files={"file": ("t.zip", zip_folder(folder))}).json()
            job = secured.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": QUICK})
            measure(secured, open_, job.json()["id"], args.samples)
            secured.post(f"/v1/jobs/{job.json()['id']}/cancel")
        stack.start_worker("bench@auth")
        fair_share(stack, secured_url, folder)


if __name__ == "__main__":
    main()
