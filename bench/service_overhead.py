"""What the service costs over running the engine directly.

Runs the same fine-tune (about a minute on 2 cores) through the service (`ftune up`: upload →
job succeeded, polled over HTTP) and through `ftune train`, alternating, and prints the ratio
of wall times (target ≤ 1.1). Then measures submit → running latency with an idle worker.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

from ftune.processes import ftune_command, start_ftune_up
from ftune.testing.archives import tar_folder
from ftune.testing.realdata import animal_mnist_arrays, balanced_indices, write_image_folder

SPEC = {"backbone": "tf_efficientnet_lite0", "image_size": 96, "epochs": 6, "batch_size": 32,
        "freeze": {"strategy": "last_n_blocks", "n_blocks": 1},
        "optimizer": {"name": "adam", "lr": 0.003}, "seed": 0}
QUICK = {"image_size": 32, "epochs": 1, "batch_size": 8}


def wait_status(client: httpx.Client, job_id: str, statuses: set[str],
                interval_s: float) -> dict:
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(interval_s)


def run_service(client: httpx.Client, archive: bytes) -> tuple[float, float]:
    started = time.perf_counter()
    dataset = client.post("/v1/datasets", files={"file": ("bench.tar.gz", archive)}).json()
    uploaded = time.perf_counter()
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": SPEC}).json()
    job = wait_status(client, job["id"], {"succeeded", "failed", "cancelled"}, 0.1)
    elapsed = time.perf_counter() - started
    if job["status"] != "succeeded":
        raise SystemExit(f"service job ended {job['status']}: {job['error']}")
    model = client.get(f"/v1/models/{job['model_id']}").json()
    stamps = {k: datetime.fromisoformat(job[k]) for k in ("created_at", "started_at",
                                                           "finished_at")}
    print(f"  service run: upload_s={uploaded - started:.2f} "
          f"queued_s={(stamps['started_at'] - stamps['created_at']).total_seconds():.2f} "
          f"running_s={(stamps['finished_at'] - stamps['started_at']).total_seconds():.2f} "
          f"fit_s={model['metrics']['train_seconds']:.2f} wall_s={elapsed:.2f}", flush=True)
    return elapsed, model["metrics"]["train_seconds"]


def run_direct(folder: Path, spec_file: Path, out: Path) -> tuple[float, float]:
    started = time.perf_counter()
    subprocess.run([*ftune_command(), "train", str(folder), "--spec",
                    str(spec_file), "--out", str(out), "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    fit_s = json.loads((out / "config.json").read_text())["train_seconds"]
    print(f"  direct run: fit_s={fit_s:.2f} wall_s={elapsed:.2f}", flush=True)
    return elapsed, fit_s


def submit_latency(client: httpx.Client, dataset_id: str, n: int) -> list[float]:
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        job = client.post("/v1/jobs", json={"dataset_id": dataset_id, "spec": QUICK}).json()
        wait_status(client, job["id"], {"running", "succeeded", "failed"}, 0.005)
        latencies.append((time.perf_counter() - started) * 1000)
        wait_status(client, job["id"], {"succeeded", "failed"}, 0.1)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-class", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-samples", type=int, default=10)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ftune-bench-"))
    images, labels = animal_mnist_arrays()
    idx = balanced_indices(labels, args.per_class)
    folder = write_image_folder(work / "data", images[idx], labels[idx])
    archive = tar_folder(folder)
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(SPEC))

    service_s, direct_s, service_fit, direct_fit = [], [], [], []
    # Its log where this bench always kept it: beside the data directory, as service.log.
    with (start_ftune_up(work / "home", log=work / "service.log") as up,
          up.operator_client(timeout=120) as client):
        for i in range(args.repeats):
            # Alternate which goes first, so drifting machine load hits both alike.
            runs = [("service", lambda: run_service(client, archive)),
                    ("direct", lambda i=i: run_direct(folder, spec_file, work / f"d{i}"))]
            for name, run in runs if i % 2 == 0 else runs[::-1]:
                wall, fit_s = run()
                (service_s if name == "service" else direct_s).append(wall)
                (service_fit if name == "service" else direct_fit).append(fit_s)
        tiny = client.post("/v1/datasets", files={"file": ("t.tar.gz", archive)}).json()
        latencies = submit_latency(client, tiny["id"], args.latency_samples)
    service_med, direct_med = statistics.median(service_s), statistics.median(direct_s)
    print(f"service_overhead service_s={service_med:.2f} direct_s={direct_med:.2f} "
          f"ratio={service_med / direct_med:.3f} best_ratio={min(service_s) / min(direct_s):.3f} "
          f"runs={args.repeats} images={len(idx)} epochs={SPEC['epochs']} "
          f"image_size={SPEC['image_size']} freeze=last_n_blocks(1) "
          f"service_all={[round(s, 1) for s in service_s]} "
          f"direct_all={[round(s, 1) for s in direct_s]}")
    # The training itself (inside fit), to show the worker's DB writes do not slow it down.
    fit_service, fit_direct = statistics.median(service_fit), statistics.median(direct_fit)
    print(f"fit_inside service_fit_s={fit_service:.2f} direct_fit_s={fit_direct:.2f} "
          f"fit_ratio={fit_service / fit_direct:.3f}")
    print(f"submit_to_running p50_ms={statistics.median(latencies):.1f} "
          f"max_ms={max(latencies):.1f} n={len(latencies)} (HTTP POST until GET shows running, "
          f"worker idle, polled every 5 ms)")


if __name__ == "__main__":
    main()
