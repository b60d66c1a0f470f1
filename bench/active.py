"""A simulated labelling loop: does labelling ftune's suggestions beat labelling at random?

Usage: ``.venv/bin/python bench/active.py [--seeds 3] [--rounds 5] [--per-round 100]``

On animal-mnist, in this process, with the same recipe (``{}``, the default) for both:
start from 10 labelled images per class drawn with the seed; each round trains a model on
the labelled images, scores it on the same 1,000 held-out test images, and then adds
``--per-round`` labels from a pool of 2,000 unlabelled images, chosen either by
``models.suggestion_run.suggest`` (uncertainty × spread, models/suggestions.py) or at random;
the "labeller" answers from the true labels. Both methods start from the same images and
use the same budgets and seeds.

Prints, per method and seed, the test accuracy after each round (``active_curve``); their
means per round and whether suggestions are at least random at every round
(``active_round``); the labels saved: how many labels random needs (read off its mean curve,
linearly between rounds) to reach the suggestion curve's final accuracy, against the
suggestions' own count (``active_labels_saved``; target ≥ 25% fewer), and the other way
round, the labels suggestions need for random's final accuracy
(``active_labels_saved_at_random_final``). Then explain-on
against explain-off single-image latency in this process (``active_explain_latency``) and
the pointing game on pasted real tiles (``active_pointing``; target ≥ 0.8).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ftune.models.bundle import save_bundle
from ftune.models.derived.store import DerivedStore
from ftune.models.explain import grad_cam
from ftune.models.predictor import Predictor
from ftune.models.spec import parse_spec
from ftune.models.suggestion_run import suggest
from ftune.models.training.fit import fit
from ftune.testing.pasted import write_pasted
from ftune.testing.realdata import ANIMAL_CLASSES, animal_mnist_arrays, balanced_indices

START_PER_CLASS = 10
POOL = 2000
TEST_PER_CLASS = 100


def write(folder: Path, images: np.ndarray, labels: np.ndarray | None, names: list[int]) -> None:
    """Images as PNGs named by their index in the arrays (labelled: in class folders)."""
    for i in names:
        target = folder / (ANIMAL_CLASSES[int(labels[i])] if labels is not None else "pool")
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(target / f"{i:05d}.png")


def train_and_score(work: Path, images: np.ndarray, labels: np.ndarray, labelled: list[int],
                    test: list[int], seed: int, derived: DerivedStore) -> tuple[float, Path]:
    """The recipe on the labelled images; test accuracy and the saved model."""
    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)
    write(data / "train", images, labels, labelled)
    write(data / "test", images, labels, test)
    result = fit(data, parse_spec({"seed": seed}), derived=derived, owner="bench")
    bundle = save_bundle(result, work / f"model-{len(labelled)}")
    return float(result.evaluation["test"]["accuracy"]), bundle


def next_labels(method: str, bundle: Path, work: Path, images: np.ndarray, pool: list[int],
                count: int, rng: np.random.Generator, derived: DerivedStore) -> list[int]:
    if method == "random":
        return [int(i) for i in rng.choice(pool, size=count, replace=False)]
    folder = work / "pool"
    shutil.rmtree(folder, ignore_errors=True)
    write(folder, images, None, pool)
    picks = suggest(bundle, folder, count, derived=derived, model_id=bundle.name)
    return [int(Path(p["path"]).stem) for p in picks]


def curve(method: str, seed: int, args: argparse.Namespace, images: np.ndarray,
          labels: np.ndarray, test: list[int], pool_all: list[int]) -> list[float]:
    rng = np.random.default_rng(seed)
    start = [int(i) for c in range(10) for i in rng.choice(
        [j for j in pool_all if labels[j] == c], START_PER_CLASS, replace=False)]
    labelled, pool = start, [i for i in pool_all if i not in set(start)]
    accuracies = []
    with tempfile.TemporaryDirectory(prefix=f"active-{method}-{seed}-") as tmp:
        work = Path(tmp)
        derived = DerivedStore(work / "derived", 8 << 30)
        for round_ in range(args.rounds + 1):
            accuracy, bundle = train_and_score(work, images, labels, labelled, test, seed,
                                               derived)
            accuracies.append(accuracy)
            print(f"active_step method={method} seed={seed} round={round_} "
                  f"labels={len(labelled)} test_accuracy={accuracy:.4f}", flush=True)
            if round_ < args.rounds:
                added = next_labels(method, bundle, work, images, pool, args.per_round, rng,
                                    derived)
                labelled = labelled + added
                pool = [i for i in pool if i not in set(added)]
    return accuracies


def labels_to_reach(target: float, counts: list[int], accuracies: list[float]) -> float | None:
    """Labels a curve needs to reach ``target``, linearly between its points."""
    for (n0, a0), (n1, a1) in zip(zip(counts, accuracies, strict=True),
                                  zip(counts[1:], accuracies[1:], strict=True), strict=False):
        if a0 >= target:
            return float(n0)
        if a1 >= target:
            return n0 + (n1 - n0) * (target - a0) / (a1 - a0)
    return None


def report(curves: dict[str, list[list[float]]], counts: list[int]) -> None:
    means = {m: [statistics.mean(r) for r in zip(*c, strict=True)] for m, c in curves.items()}
    for method, seeds in curves.items():
        for seed, accuracies in enumerate(seeds):
            print(f"active_curve method={method} seed={seed} "
                  + " ".join(f"{n}:{a:.4f}" for n, a in zip(counts, accuracies, strict=True)))
    at_least = all(s >= r for s, r in zip(means["suggestions"], means["random"], strict=True))
    for n, s, r in zip(counts, means["suggestions"], means["random"], strict=True):
        print(f"active_round labels={n} suggestions={s:.4f} random={r:.4f} diff={s - r:+.4f}")
    print(f"active_round suggestions_at_least_random_every_round={at_least}")
    final = means["suggestions"][-1]
    needed = labels_to_reach(final, counts, means["random"])
    if needed is None:  # random never got there: it needs more than the whole budget
        print(f"active_labels_saved suggestion_final_accuracy={final:.4f} "
              f"suggestion_labels={counts[-1]} random_labels_needed=>{counts[-1]} "
              f"saved=>0 (random never reached it) target_saved=0.25")
    else:
        print(f"active_labels_saved suggestion_final_accuracy={final:.4f} "
              f"suggestion_labels={counts[-1]} random_labels_needed={needed:.0f} "
              f"saved={1 - counts[-1] / needed:.3f} target_saved=0.25")
    # Read the other way, within the budget: the labels suggestions need for random's final
    # accuracy (when random never reaches the suggestions' own, the line above cannot say).
    random_final = means["random"][-1]
    fewer = labels_to_reach(random_final, counts, means["suggestions"])
    if fewer is not None:
        print(f"active_labels_saved_at_random_final random_final_accuracy={random_final:.4f} "
              f"random_labels={counts[-1]} suggestion_labels_needed={fewer:.0f} "
              f"saved={1 - fewer / counts[-1]:.3f} target_saved=0.25")


def explain_latency(bundle: Path, image: np.ndarray, repeats: int = 30) -> None:
    predictor = Predictor.load(bundle, device="cpu")
    batch = predictor.to_uint8([Image.fromarray(image)])
    plain, explained = [], []
    for _ in range(repeats):
        for into, explain in ((plain, False), (explained, True)):
            started = time.perf_counter()
            predictor.probabilities(batch)
            if explain:
                grad_cam(predictor.model, batch, predictor.preprocessing)
            into.append((time.perf_counter() - started) * 1000)
    off, on = statistics.median(plain), statistics.median(explained)
    print(f"active_explain_latency explain_off_p50_ms={off:.1f} explain_on_p50_ms={on:.1f} "
          f"ratio={on / off:.2f} image_size={predictor.preprocessing.input_size} in_process")


def pointing(work: Path, tests: int = 200) -> None:
    root = work / "pasted"
    boxes = write_pasted(root, [0, 1, 12], {"train": 150, "test": tests}, canvas=160, seed=2)
    result = fit(root, parse_spec({"image_size": 160, "epochs": 4, "batch_size": 16, "seed": 1,
                                   "freeze": {"strategy": "last_n_blocks", "n_blocks": 2}}))
    prep = result.preprocessing
    scale, offset = prep.resize_size / 160, (prep.resize_size - prep.input_size) / 2
    predictor = Predictor.load(save_bundle(result, work / "pasted-model"), device="cpu")
    paths = sorted(boxes)
    full = grad_cam(predictor.model, predictor.to_uint8([Image.open(root / p) for p in paths]),
                    prep).upsampled(prep.input_size)
    hits = 0
    for heat, path in zip(full, paths, strict=True):
        x0, y0, x1, y1 = (v * scale - offset for v in boxes[path])
        y, x = divmod(int(heat.flatten().argmax()), heat.shape[1])
        hits += x0 <= x + 0.5 <= x1 and y0 <= y + 0.5 <= y1
    print(f"active_pointing hits={hits} images={len(paths)} fraction={hits / len(paths):.3f} "
          "target=0.8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    images, labels = animal_mnist_arrays()
    test = [int(i) for i in balanced_indices(labels, TEST_PER_CLASS)]
    rest = [i for i in range(len(labels)) if i not in set(test)]
    pool_all = [int(i) for i in np.random.default_rng(0).choice(rest, POOL, replace=False)]
    curves: dict[str, list[list[float]]] = {"suggestions": [], "random": []}
    for seed in range(args.seeds):  # interleaved: drifting load hits both alike
        for method in curves:
            curves[method].append(curve(method, seed, args, images, labels, test, pool_all))
    counts = [START_PER_CLASS * 10 + r * args.per_round for r in range(args.rounds + 1)]
    report(curves, counts)
    with tempfile.TemporaryDirectory(prefix="active-explain-") as tmp:
        work = Path(tmp)
        start = pool_all[:200]
        _, bundle = train_and_score(work, images, labels, start, test, 0,
                                    DerivedStore(work / "derived", 4 << 30))
        explain_latency(bundle, images[test[0]])
        pointing(work)


if __name__ == "__main__":
    main()
