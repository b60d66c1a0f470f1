"""The default recipe against what users write by hand, on two packaged datasets.

Usage: ``.venv/bin/python bench/defaults.py [--datasets animal-mnist digits] [--seeds 3]``

For each dataset (training images in ``train/``, held-out ones in ``test/``), side by side in
one run on this machine:

* ``empty_spec``: ``POST /v1/jobs`` with ``{}`` through the service (``ftune up``, one
  worker), from the upload until the job has succeeded; accuracy on the held-out images
  from the model's evaluation.
* ``fast``: the same with ``{"preset": "fast"}``; and ``fast_in_process``, ``fit`` with it in
  this process, timed stage by stage (setup, features, head, evaluate, bundle).
* ``probe``: hand-written frozen-feature probe. Decode, resize, lite0 features at the size
  the recipe picks, then scikit-learn's logistic regression (standardised features, L2).
* ``full_finetune``: hand-written full fine-tune, ``fit`` with every stage training, Adam
  1e-3, 3 epochs, no augmentation, all training images.

Datasets: animal-mnist (28 px silhouettes, 3,000 training and 1,000 held-out images),
scikit-learn's digits (8 px digits upscaled to 32 px, 1,300 and 497) and scikit-image's
lfw_subset as faces (25 px faces and non-faces, 160 and 40).

``--sizes 64 96 128 224`` measures only the probe at each size: the image_size rule
(``models/recipe/rules.py``) is chosen from that.

``empty_spec`` and ``full_finetune`` run with ``--seeds`` seeds (default 3, interleaved; the
first job is ``{}`` itself, the others ``{"seed": s}``): one seed of a full fine-tune on a
thousand images moves by a point or more, so one run decides nothing.

Every ``{}`` job starts cold: the cache of decoded images and features is cleaned before it
(``ftune cache clean``), so it decodes and computes features as a first job on new data does.

Targets: ``empty_spec``'s mean accuracy at least the better reference's (the probe, or the
full fine-tune's mean), in no more than the full fine-tune's mean wall time; ``fast`` within
1.5x the probe's wall time at its accuracy.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from service_overhead import wait_status

from ftune.models.backbones import create_backbone
from ftune.models.data.discover import scan_image_folder
from ftune.models.data.source import ImageSource
from ftune.models.data.transforms import normalize
from ftune.models.training.fit import fit
from ftune.processes import ftune_command, start_ftune_up
from ftune.testing.archives import tar_folder
from ftune.testing.realdata import (
    animal_mnist_arrays,
    balanced_indices,
    write_faces,
    write_image_folder,
)

BACKBONE = "tf_efficientnet_lite0"
FULL_FINETUNE = {"backbone": BACKBONE, "image_size": 96, "epochs": 3, "batch_size": 32,
                 "freeze": {"strategy": "none"}, "augment": "none", "val_fraction": 0.0,
                 "optimizer": {"name": "adam", "lr": 1e-3, "layer_decay": None},
                 "schedule": {"name": "constant"}, "class_weights": "none"}


def animal_mnist(root: Path) -> Path:
    images, labels = animal_mnist_arrays()
    for split, per_class, offset in (("train", 300, 0), ("test", 100, 300)):
        idx = balanced_indices(labels, per_class, offset=offset)
        write_image_folder(root / split, images[idx], labels[idx])
    return root


def digits(root: Path) -> Path:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images * (255 / 16)).astype(np.uint8)
    for i, (image, label) in enumerate(zip(images, data.target, strict=True)):
        rank = int(np.sum(data.target[:i] == label))
        split = "train" if rank < 130 else "test"
        folder = root / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize((32, 32), Image.BICUBIC).save(folder / f"{i:05d}.png")
    return root


def faces(root: Path, split_seed: int | None = None) -> Path:
    """Small and tiny (160 training images of 25 px): where fine-tuning has the least to gain."""
    return write_faces(root, split_seed)


DATASETS = {"animal-mnist": animal_mnist, "digits": digits, "faces": faces}


def probe(root: Path, image_size: int) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    started = time.perf_counter()
    index = scan_image_folder(root)
    backbone = create_backbone(BACKBONE, pretrained=True, image_size=image_size)
    model = backbone.model.eval()

    def features(samples: list) -> tuple[np.ndarray, np.ndarray]:
        source = ImageSource([s.path for s in samples], [s.label for s in samples],
                             backbone.preprocessing, image_size)
        chunks = []
        with torch.no_grad():
            for images, _, _ in source.batches(torch.arange(len(source)), 64):
                chunks.append(model(normalize(images.float(), backbone.preprocessing)))
        return torch.cat(chunks).numpy(), source.labels.numpy()

    train_x, train_y = features(index.train)
    test_x, test_y = features(index.test or [])
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    classifier.fit(train_x, train_y)
    accuracy = float((classifier.predict(test_x) == test_y).mean())
    return accuracy, time.perf_counter() - started


def fast_profile(root: Path) -> tuple[float, float, str]:
    """``fit`` with preset fast in this process, timed stage by stage, plus the bundle."""
    from ftune.models.bundle import save_bundle
    from ftune.models.training.fit import Callbacks

    marks: list[tuple[str, float]] = [("setup", time.perf_counter())]
    result = fit(root, {"preset": "fast"}, callbacks=Callbacks(
        on_stage=lambda stage, *_: marks.append((stage, time.perf_counter()))))
    marks.append(("bundle", time.perf_counter()))
    save_bundle(result, Path(tempfile.mkdtemp()) / "model")
    marks.append(("end", time.perf_counter()))
    parts = " ".join(f"{name}_s={b - a:.1f}" for (name, a), (_, b) in itertools.pairwise(marks))
    return result.evaluation["test"]["accuracy"], marks[-1][1] - marks[0][1], parts


def full_finetune(root: Path, seed: int) -> tuple[float, float]:
    started = time.perf_counter()
    result = fit(root, {**FULL_FINETUNE, "seed": seed})
    return result.evaluation["test"]["accuracy"], time.perf_counter() - started


def through_service(client: httpx.Client, archive: bytes, spec: dict) -> tuple[float, float, dict]:
    started = time.perf_counter()
    dataset = client.post("/v1/datasets", files={"file": ("data.tar.gz", archive)}).json()
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": spec}).json()
    job = wait_status(client, job["id"], {"succeeded", "failed", "cancelled"}, 0.2)
    elapsed = time.perf_counter() - started
    if job["status"] != "succeeded":
        raise SystemExit(f"job ended {job['status']}: {job['error']}")
    evaluation = client.get(f"/v1/models/{job['model_id']}/evaluation").json()
    return evaluation["test"]["accuracy"], elapsed, job


def show(name: str, method: str, accuracy: float, wall: float, extra: str = "") -> None:
    print(f"defaults dataset={name} method={method} accuracy={accuracy:.4f} "
          f"wall_s={wall:.1f}{' ' + extra if extra else ''}", flush=True)


def mean_sd(values: list[float], digits: int = 4) -> str:
    return f"{np.mean(values):.{digits}f}±{np.std(values):.{digits}f}"


def clean_cache(home: Path) -> None:
    """``ftune cache clean``: the next job decodes the images and computes their features
    again, as a first job on new data does (the full fine-tune keeps nothing either)."""
    subprocess.run(ftune_command("cache", "clean", "--home", str(home)), check=True,
                   capture_output=True)


def seeded_runs(name: str, archive: bytes, root: Path, client: httpx.Client, home: Path,
                seeds: int) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """``{}`` through the service and the full fine-tune with seeds 0..seeds-1, interleaved;
    seed 0's job is ``{}`` itself, the others ``{"seed": s}``; every ``{}`` job cold."""
    empty, full = [], []
    for seed in range(seeds):
        clean_cache(home)
        acc, wall, job = through_service(client, archive, {"seed": seed} if seed else {})
        empty.append((acc, wall))
        stages = [row["stage"] for row in job["metrics"]]
        show(name, "empty_spec", acc, wall,
             f"seed={seed} head_epochs={stages.count('head')} "
             f"finetune_epochs={stages.count('finetune')} "
             f"lr={job['resolved']['optimizer.lr']['value']} "
             f"diagnosis={[f['code'] for f in job['diagnosis']]}")
        full.append(full_finetune(root, seed))
        show(name, "full_finetune", *full[-1], f"seed={seed} image_size=96 epochs=3")
    return empty, full


def run_dataset(name: str, root: Path, client: httpx.Client, home: Path,
                seeds: int) -> None:
    archive = tar_folder(root)
    fast_acc, fast_wall, job = through_service(client, archive, {"preset": "fast"})
    size = job["resolved"]["image_size"]["value"]
    show(name, "fast", fast_acc, fast_wall, f"image_size={size} epochs={len(job['metrics'])}")
    probe_acc, probe_wall = probe(root, size)
    show(name, "probe", probe_acc, probe_wall, f"image_size={size}")
    acc, wall, parts = fast_profile(root)
    show(name, "fast_in_process", acc, wall, f"{parts} (ratio to probe "
         f"{wall / probe_wall:.2f})")
    empty, full = seeded_runs(name, archive, root, client, home, seeds)
    empty_acc, full_acc = [a for a, _ in empty], [a for a, _ in full]
    # Means over the seeds: one seed of a full fine-tune moves by a point or more, and its
    # time by several seconds.
    empty_wall = float(np.mean([w for _, w in empty]))
    full_wall = float(np.mean([w for _, w in full]))
    best_reference = max(probe_acc, float(np.mean(full_acc)))
    print(f"defaults dataset={name} seeds={seeds} empty_spec_accuracy={mean_sd(empty_acc)} "
          f"full_finetune_accuracy={mean_sd(full_acc)} "
          f"empty_spec_wall_s={mean_sd([w for _, w in empty], 1)} "
          f"full_finetune_wall_s={mean_sd([w for _, w in full], 1)}", flush=True)
    print(f"defaults dataset={name} targets empty_spec_accuracy={np.mean(empty_acc):.4f} "
          f"best_reference={best_reference:.4f} (met: {np.mean(empty_acc) >= best_reference}) "
          f"empty_spec_vs_full_finetune_time={empty_wall / full_wall:.2f} (<= 1: "
          f"{empty_wall <= full_wall}) fast_vs_probe_time={fast_wall / probe_wall:.2f} "
          f"(<= 1.5: {fast_wall <= 1.5 * probe_wall}) fast_accuracy={fast_acc:.4f} "
          f"probe_accuracy={probe_acc:.4f} (met: {fast_acc >= probe_acc})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS),
                        default=["animal-mnist", "digits", "faces"])
    parser.add_argument("--seeds", type=int, default=3, help="seeds of {} and of the full "
                        "fine-tune per dataset (accuracy targets compare their means)")
    parser.add_argument("--sizes", nargs="+", type=int, help="only measure the probe at "
                        "these image sizes (what the image_size rule is chosen from)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftune-defaults-"))
    if args.sizes:
        for name in args.datasets:
            root = DATASETS[name](work / name)
            for size in args.sizes:
                accuracy, wall = probe(root, size)
                show(name, f"probe_{size}px", accuracy, wall)
        return
    home = work / "home"
    with (start_ftune_up(home, log=work / "service.log") as up,
          up.operator_client(timeout=300) as client):
        for name in args.datasets:
            run_dataset(name, DATASETS[name](work / name), client, home, args.seeds)


if __name__ == "__main__":
    main()
