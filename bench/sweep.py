"""A hyperparameter sweep against the default recipe, through the service.

Usage: ``.venv/bin/python bench/sweep.py [--trials 12] [--train-per-class 300]``

``ftune up --workers 2`` on this machine; animal-mnist with 3,000 training images (300 per
class) and 1,000 held out (in ``test/``, scored by each model's evaluation). First a job
with no spec (``{}``, the default recipe), then a sweep of 12 trials, two at a time, over:

    optimizer.lr     log_uniform [1e-4, 1e-2]
    freeze.strategy  choice [head_only, last_n_blocks, gradual]
    freeze.n_blocks  int [1, 4]
    head.dropout     uniform [0, 0.5]
    optimizer.name   choice [adam, adamw, nesterov]
    image_size       choice [64, 96, 128]

with ``base = {"epochs": 4}`` (every trial asks for 4 epochs: the ratio of epochs run to
epochs asked then measures pruning, not early stopping), TPE and successive halving (asha).

Prints the best trial's held-out accuracy against the default job's, the sweep's wall time,
epochs run / epochs asked, and the feature cache: head-only trials after the first at the
same image size should reuse the first one's frozen features.

Targets: best trial >= default; pruning saves >= 40% of epochs; head-only trials after the
first (per image size) reuse the cached features.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx
from service_overhead import wait_status

from ftune.processes import start_ftune_up
from ftune.testing.archives import tar_folder
from ftune.testing.realdata import animal_mnist_arrays, balanced_indices, write_image_folder

SPACE = {"optimizer.lr": {"log_uniform": [1e-4, 1e-2]},
         "freeze.strategy": {"choice": ["head_only", "last_n_blocks", "gradual"]},
         "freeze.n_blocks": {"int": [1, 4]},
         "head.dropout": {"uniform": [0, 0.5]},
         "optimizer.name": {"choice": ["adam", "adamw", "nesterov"]},
         "image_size": {"choice": [64, 96, 128]}}
BASE = {"epochs": 4}
DONE = {"succeeded", "failed", "cancelled", "pruned"}


def dataset(root: Path, per_class: int) -> Path:
    images, labels = animal_mnist_arrays()
    for split, count, offset in (("train", per_class, 0), ("test", 100, per_class)):
        idx = balanced_indices(labels, count, offset=offset)
        write_image_folder(root / split, images[idx], labels[idx])
    return root


def test_accuracy(client: httpx.Client, model_id: str) -> float:
    return client.get(f"/v1/models/{model_id}/evaluation").json()["test"]["accuracy"]


def default_job(client: httpx.Client, dataset_id: str) -> tuple[float, float]:
    started = time.perf_counter()
    job = client.post("/v1/jobs", json={"dataset_id": dataset_id, "spec": {}}).json()
    job = wait_status(client, job["id"], DONE, 0.5)
    if job["status"] != "succeeded":
        raise SystemExit(f"default job ended {job['status']}: {job['error']}")
    return test_accuracy(client, job["model_id"]), time.perf_counter() - started


def run_sweep(client: httpx.Client, dataset_id: str, trials: int) -> tuple[dict, float]:
    started = time.perf_counter()
    sweep = client.post("/v1/sweeps", json={
        "dataset_id": dataset_id, "base": BASE, "space": SPACE, "n_trials": trials,
        "parallelism": 2, "pruner": "asha", "sampler": "tpe", "seed": 0})
    if sweep.status_code != 202:
        raise SystemExit(f"sweep refused: {sweep.text}")
    sweep_id = sweep.json()["id"]
    while (view := client.get(f"/v1/sweeps/{sweep_id}").json())["status"] == "running":
        time.sleep(2)
    return view, time.perf_counter() - started


def cache_report(client: httpx.Client, trials: list[dict]) -> str:
    """Head-only trials in the order they started: the first at each size computes the
    features, every later one should reuse them."""
    seen: set = set()
    later = reused = 0
    for trial in trials:
        job = client.get(f"/v1/jobs/{trial['job_id']}").json()
        if job["spec"]["freeze"]["strategy"] != "head_only":
            continue
        size = job["spec"]["image_size"]
        value = job["resolved"].get("feature_cache", {}).get("value")
        if size in seen:
            later += 1
            reused += value == "reused"
        seen.add(size)
    rate = reused / later if later else float("nan")
    return (f"head_only_trials={later + len(seen)} sizes={len(seen)} later_trials={later} "
            f"reused={reused} hit_rate={rate:.2f} (all: {later == 0 or reused == later})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--train-per-class", type=int, default=300)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftune-sweep-"))
    root = dataset(work / "animal-mnist", args.train_per_class)
    with (start_ftune_up(work / "home", workers=2, log=work / "service.log") as up,
          up.operator_client(timeout=300) as client):
        uploaded = client.post("/v1/datasets",
                               files={"file": ("data.tar.gz", tar_folder(root))}).json()
        print(f"sweep dataset=animal-mnist train={args.train_per_class * 10} test=1000 "
              f"trials={args.trials} parallelism=2 workers=2 pruner=asha sampler=tpe "
              f"base={BASE}", flush=True)
        default_acc, default_s = default_job(client, uploaded["id"])
        print(f"sweep default_job spec={{}} accuracy={default_acc:.4f} wall_s={default_s:.1f}",
              flush=True)
        view, wall = run_sweep(client, uploaded["id"], args.trials)
        report(client, view, wall, default_acc)


def report(client: httpx.Client, view: dict, wall: float, default_acc: float) -> None:
    trials = view["trials"]
    for t in trials:
        print(f"sweep trial={t['number']} status={t['status']} epochs={t['epoch']}/"
              f"{t['epochs']} val_accuracy={t['value']} params={t['params']}", flush=True)
    best = view["best_trial"]
    best_acc = test_accuracy(client, best["model_id"]) if best else float("nan")
    pruned = sum(t["pruned"] for t in trials)
    saved = 1 - view["epochs_run"] / view["epochs_asked"]
    print(f"sweep best_trial number={best and best['number']} accuracy={best_acc:.4f} "
          f"default_accuracy={default_acc:.4f} params={best and best['params']}")
    print(f"sweep wall_s={wall:.1f} status={view['status']} trials={len(trials)} "
          f"pruned={pruned}")
    print(f"sweep epochs_run={view['epochs_run']} epochs_asked={view['epochs_asked']} "
          f"ratio={view['epochs_run'] / view['epochs_asked']:.2f} saved={saved:.0%}")
    print(f"sweep feature_cache {cache_report(client, trials)}")
    print(f"sweep targets best_vs_default={best_acc - default_acc:+.4f} (met: "
          f"{best_acc >= default_acc}) epochs_saved={saved:.0%} (>= 40%: {saved >= 0.4})",
          flush=True)


if __name__ == "__main__":
    main()
