"""Does learning from unlabelled images help when labels are few? Measured, not assumed.

Usage: ``.venv/bin/python bench/unlabeled.py [--seeds 3] [--digits-seeds 3]
[--datasets animal-mnist digits] [--quick]``

A low-label regime on real packaged data, each configuration trained with ``fit`` in this
process, side by side in one run:

* animal-mnist: 10 labelled images per class (10 classes), 3,000 unlabelled ones in the
  dataset's ``unlabeled/`` folder, 1,000 held-out test images; every seed draws other
  labelled images.
* scikit-learn's digits (8 px, upscaled to 32 px): 10 labelled per class, the rest of the
  training half unlabelled, 497 held out; 3 seeds too (``--digits-seeds``), each drawing
  other labelled images.

Configurations (all at 64 px, the auto recipe otherwise):

1. ``imagenet``: ImageNet fine-tune only, ``{}``;
2. ``autoencoder``: plus ``pretrain: autoencoder``;
3. ``contrastive``: plus ``pretrain: contrastive`` (SimSiam);
4. ``pseudo_labels``: plus two rounds of pseudo-labels;
5. ``best``: the best pretraining of 2-3 (if it beat 1) with pseudo-labels (if 4 beat 1);
6. ``scratch`` and ``scratch_autoencoder``: ``pretrained: false``, without and with the
   autoencoder: the chapter's original motivation next to ImageNet transfer.

Prints held-out accuracy and wall time per configuration, mean and spread (max - min) over
the seeds. ``--quick`` checks the plumbing in a few minutes (one seed, fewer images, one
pretraining epoch); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ftune.models.training.fit import fit
from ftune.testing.realdata import animal_mnist_arrays, balanced_indices, write_image_folder

SIZE = 64
PRETRAIN_EPOCHS = 4
BASE = {"image_size": SIZE}


def _save_unlabeled(root: Path, images: np.ndarray) -> None:
    folder = root / "unlabeled"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"u{i:05d}.png")


def animal_mnist(root: Path, seed: int, unlabeled_per_class: int) -> Path:
    images, labels = animal_mnist_arrays()
    labelled = balanced_indices(labels, 10, offset=10 * seed)
    write_image_folder(root / "train", images[labelled], labels[labelled])
    test = balanced_indices(labels, 100, offset=100)
    write_image_folder(root / "test", images[test], labels[test])
    _save_unlabeled(root, images[balanced_indices(labels, unlabeled_per_class, offset=200)])
    return root


def digits(root: Path, seed: int, _: int) -> Path:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images * (255 / 16)).astype(np.uint8)
    rank = np.array([int(np.sum(data.target[:i] == y)) for i, y in enumerate(data.target)])
    unlabeled = []
    for i, (image, label) in enumerate(zip(images, data.target, strict=True)):
        big = np.asarray(Image.fromarray(image).resize((32, 32), Image.BICUBIC))
        if rank[i] >= 130:
            folder = root / "test" / f"digit{label}"
        elif 10 * seed <= rank[i] < 10 * seed + 10:
            folder = root / "train" / f"digit{label}"
        else:
            unlabeled.append(big)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(big).save(folder / f"{i:05d}.png")
    _save_unlabeled(root, np.stack(unlabeled))
    return root


def configurations(epochs: int) -> dict[str, dict]:
    pretrain = {"epochs": epochs}
    return {
        "imagenet": {},
        "autoencoder": {"pretrain": {"method": "autoencoder", **pretrain}},
        "contrastive": {"pretrain": {"method": "contrastive", **pretrain}},
        "pseudo_labels": {"pseudo_labels": {"rounds": 2}},
        "scratch": {"pretrained": False},
        "scratch_autoencoder": {"pretrained": False,
                                "pretrain": {"method": "autoencoder", **pretrain}},
    }


def best_combination(results: dict[str, list[tuple[float, float]]], epochs: int) -> dict:
    """The better pretraining if it beat ImageNet alone, with pseudo-labels if they did."""
    mean = {name: statistics.mean(a for a, _ in runs) for name, runs in results.items()}
    spec: dict = {}
    method = max(("autoencoder", "contrastive"), key=mean.__getitem__)
    if mean[method] > mean["imagenet"]:
        spec["pretrain"] = {"method": method, "epochs": epochs}
    if mean["pseudo_labels"] > mean["imagenet"]:
        spec["pseudo_labels"] = {"rounds": 2}
    return spec


def run(root: Path, spec: dict, seed: int) -> tuple[float, float]:
    started = time.perf_counter()
    result = fit(root, {**BASE, **spec, "seed": seed})
    return result.evaluation["test"]["accuracy"], time.perf_counter() - started


def show(dataset: str, name: str, runs: list[tuple[float, float]], extra: str = "") -> None:
    accuracies, walls = [a for a, _ in runs], [w for _, w in runs]
    spread = max(accuracies) - min(accuracies)
    print(f"unlabeled dataset={dataset} config={name} accuracy={statistics.mean(accuracies):.4f}"
          f"±{spread / 2:.4f} wall_s={statistics.mean(walls):.1f} seeds={len(runs)}"
          f"{' ' + extra if extra else ''}", flush=True)


def bench_dataset(name: str, make, seeds: int, epochs: int, unlabeled_per_class: int) -> None:
    roots = [make(Path(tempfile.mkdtemp()) / name, seed, unlabeled_per_class)
             for seed in range(seeds)]
    results: dict[str, list[tuple[float, float]]] = {}
    for config, spec in configurations(epochs).items():
        results[config] = [run(root, spec, seed) for seed, root in enumerate(roots)]
        show(name, config, results[config])
    combination = best_combination(results, epochs)
    runs = [run(root, combination, seed) for seed, root in enumerate(roots)]
    show(name, "best", runs, f"spec={combination}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds on animal-mnist")
    parser.add_argument("--digits-seeds", type=int, default=3,
                        help="seeds on digits (each draws other labelled images)")
    parser.add_argument("--datasets", nargs="+", default=["animal-mnist", "digits"],
                        choices=["animal-mnist", "digits"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    epochs = 1 if args.quick else PRETRAIN_EPOCHS
    seeds, per_class = (1, 30) if args.quick else (args.seeds, 300)
    digits_seeds = 1 if args.quick else args.digits_seeds
    print(f"unlabeled setup size={SIZE} pretrain_epochs={epochs} seeds={seeds} "
          f"digits_seeds={digits_seeds} labelled_per_class=10 unlabelled={per_class * 10}",
          flush=True)
    if "animal-mnist" in args.datasets:
        bench_dataset("animal-mnist", animal_mnist, seeds, epochs, per_class)
    if "digits" in args.datasets:
        bench_dataset("digits", digits, digits_seeds, epochs, per_class)


if __name__ == "__main__":
    main()
