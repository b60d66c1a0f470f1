"""Training throughput of ``fit`` against a bare PyTorch loop, and what its caches save.

Usage: ``.venv/bin/python bench/train_throughput.py [--images N] [--epochs E] ...``

Two measurements, each printed as one ``key=value`` line:

* ``full_finetune``: ``fit`` with every stage training (``freeze.strategy="none"``, no
  augmentation, ``val_fraction=0``) on an image folder of N real animal-mnist images, against a
  bare loop (same backbone and head, ``model.train()``, cross-entropy, Adam, same batch size,
  resolution and torch threads) on a pre-made normalised float tensor of N images, twice: with
  the model and batches channels last, as fit lays them out (``ratio``, fit's own overhead),
  and contiguous, as a loop written without thought for layout (``ratio_to_contiguous``).
  Images/s come from the epochs after the first: fit's first epoch also decodes the images,
  and the bare loops' first epoch is dropped the same way (after an untimed warm-up step).
* ``head_only``: ``fit`` head-only (BatchNorm frozen, no augmentation) with the feature cache on
  against ``cache_features=False``; seconds per epoch after the first.
* ``top_stages``: ``fit`` training the top 3 stages (BatchNorm of the rest frozen, no
  augmentation, N images) with the frozen stages' outputs cached against
  ``cache_features=False``, which runs them at every step; seconds per epoch after the first.

``ratio`` is fit / channels-last bare images/s (target >= 0.9); ``speedup`` is recompute /
cached epoch seconds (head-only target >= 50; top stages: what the frozen-stage cache gains).
Each comparison runs ``--repeats`` alternating rounds; the plain keys pool all timed epochs,
the ``*_best_*`` keys use the fastest one. The one-minute
load average is printed too: another process using the CPUs (even one other torch process on a
2-core machine) slows epochs by up to 20x and makes the numbers meaningless.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ftune.models.backbones import create_backbone
from ftune.models.data.transforms import normalize
from ftune.models.network import FineTuneModel, build_head
from ftune.models.spec import FineTuneSpec
from ftune.models.training.fit import fit
from ftune.testing.realdata import animal_mnist_arrays, balanced_indices, write_image_folder

BACKBONE = "tf_efficientnet_lite0"
TOP_STAGES = 3  # what the default recipe trains from 500 images


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=480,
                        help="training images for the full fine-tune comparison")
    parser.add_argument("--head-images", type=int, default=1000,
                        help="training images for the head-only comparison")
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs per run; epochs 2..E are timed (at least 2)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=2,
                        help="alternating fit / bare (or cached / recompute) rounds; the "
                        "fastest timed epoch over all rounds gives the *_best_* keys")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's current setting)")
    parser.add_argument("--skip-full", action="store_true", help="no full fine-tune comparison")
    parser.add_argument("--skip-head", action="store_true",
                        help="no head-only comparison")
    parser.add_argument("--skip-top", action="store_true",
                        help="no top-stages comparison")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is not timed)")
    return args


def per_epoch_samples(n: int, batch_size: int) -> int:
    """Samples fit trains on per epoch: it drops a final batch of one (BatchNorm)."""
    return n - 1 if n % batch_size == 1 and n > 1 else n


def image_folder(root: Path, n: int) -> Path:
    images, labels = animal_mnist_arrays()
    idx = balanced_indices(labels, -(-n // 10))[:n]  # ceil(n / 10) a class, n in all
    return write_image_folder(root, images[idx], labels[idx])


def base_spec(args: argparse.Namespace, **overrides: object) -> FineTuneSpec:
    spec = {
        "backbone": BACKBONE,
        "pretrained": True,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "val_fraction": 0.0,
        "augment": "none",
        "mixed_precision": "off",
        "optimizer": {"name": "adam", "lr": args.lr},
        # Train loss is monitored without a val split; never stop inside the timed epochs.
        "early_stopping": {"patience": max(args.epochs, 1)},
    }
    spec.update(overrides)
    return FineTuneSpec.model_validate(spec)


def timed_epochs(seconds: list[float]) -> float:
    return sum(seconds[1:])


def bare_loop(args: argparse.Namespace, n: int, *, channels_last: bool
              ) -> tuple[float, list[float]]:
    """Images/s (epochs 2..E) and per-epoch seconds of a plain train loop over a pre-made
    normalised tensor, channels last (model and batches) or contiguous."""
    spec = base_spec(args)
    torch.manual_seed(0)
    backbone = create_backbone(BACKBONE, pretrained=True, num_classes=0,
                               image_size=args.image_size)
    model = FineTuneModel(backbone.model, build_head(backbone.num_features, 10, spec.head))
    prep = backbone.preprocessing
    images = normalize(torch.randint(0, 256, (n, 3, args.image_size, args.image_size),
                                     dtype=torch.uint8), prep)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    images = images.contiguous(memory_format=layout)
    model = model.to(memory_format=layout)
    labels = torch.randint(0, 10, (n,))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    per_epoch = per_epoch_samples(n, args.batch_size)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    step(images[:args.batch_size], labels[:args.batch_size])  # warm-up, untimed
    seconds = []
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))[:per_epoch]
        started = time.perf_counter()
        for start in range(0, per_epoch, args.batch_size):
            idx = order[start:start + args.batch_size]
            step(images[idx].contiguous(memory_format=layout), labels[idx])
        seconds.append(time.perf_counter() - started)
    return per_epoch * (args.epochs - 1) / timed_epochs(seconds), seconds


def fmt(seconds: list[float]) -> str:
    return ",".join(f"{s:.3f}" for s in seconds)


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def full_finetune(args: argparse.Namespace, data: Path, n: int) -> None:
    spec = base_spec(args, freeze={"strategy": "none"})
    per_epoch = per_epoch_samples(n, args.batch_size)
    fit_timed: list[float] = []
    bare_timed: list[float] = []  # channels last, as fit
    contiguous_timed: list[float] = []
    load_before = load()
    for round_ in range(args.repeats):
        result = fit(data, spec, device="cpu")
        assert result.num_val == 0 and result.num_train == n, (result.num_train, result.num_val)
        assert all(not row["feature_cache"] for row in result.history)
        fit_seconds = [row["seconds"] for row in result.history]
        _, bare_seconds = bare_loop(args, n, channels_last=True)
        _, contiguous_seconds = bare_loop(args, n, channels_last=False)
        fit_timed += fit_seconds[1:]
        bare_timed += bare_seconds[1:]
        contiguous_timed += contiguous_seconds[1:]
        print(f"full_finetune_round round={round_ + 1} fit_epoch_s={fmt(fit_seconds)} "
              f"bare_epoch_s={fmt(bare_seconds)} "
              f"bare_contiguous_epoch_s={fmt(contiguous_seconds)} "
              f"fit_total_s={result.seconds:.2f} "
              f"load1={load()}", flush=True)
    fit_img_s = per_epoch * len(fit_timed) / sum(fit_timed)
    bare_img_s = per_epoch * len(bare_timed) / sum(bare_timed)
    contiguous_img_s = per_epoch * len(contiguous_timed) / sum(contiguous_timed)
    fit_best = per_epoch / min(fit_timed)
    bare_best = per_epoch / min(bare_timed)
    print(f"full_finetune fit_img_s={fit_img_s:.2f} bare_img_s={bare_img_s:.2f} "
          f"ratio={fit_img_s / bare_img_s:.3f} bare_contiguous_img_s={contiguous_img_s:.2f} "
          f"ratio_to_contiguous={fit_img_s / contiguous_img_s:.3f} "
          f"fit_best_img_s={fit_best:.2f} "
          f"bare_best_img_s={bare_best:.2f} best_ratio={fit_best / bare_best:.3f} "
          f"images={n} epochs={args.epochs} repeats={args.repeats} "
          f"image_size={args.image_size} batch_size={args.batch_size} "
          f"threads={torch.get_num_threads()} load1_before={load_before} load1_after={load()}",
          flush=True)


def head_only(args: argparse.Namespace, data: Path, n: int) -> None:
    cache_comparison(args, data, n, "head_only", "feature_cache",
                     {"strategy": "head_only", "batchnorm": "frozen"})


def top_stages(args: argparse.Namespace, data: Path, n: int) -> None:
    cache_comparison(args, data, n, "top_stages", "frozen_stage_cache",
                     {"strategy": "last_n_blocks", "n_blocks": TOP_STAGES,
                      "batchnorm": "frozen"})


def cache_comparison(args: argparse.Namespace, data: Path, n: int, name: str, row_key: str,
                     freeze: dict) -> None:
    """``fit`` with ``freeze`` and its cache on (``row_key`` true in every epoch's row)
    against ``cache_features=False``, alternating rounds; epochs 2..E timed."""
    spec = base_spec(args, freeze=freeze)
    per_epoch = per_epoch_samples(n, args.batch_size)
    cached_timed: list[float] = []
    recompute_timed: list[float] = []
    same = True
    load_before = load()
    for round_ in range(args.repeats):
        cached = fit(data, spec, device="cpu", cache_features=True)
        recompute = fit(data, spec, device="cpu", cache_features=False)
        assert cached.num_train == n and cached.num_val == 0
        assert all(row[row_key] for row in cached.history)
        assert not any(row[row_key] for row in recompute.history)
        cached_s = [row["seconds"] for row in cached.history]
        recompute_s = [row["seconds"] for row in recompute.history]
        cached_timed += cached_s[1:]
        recompute_timed += recompute_s[1:]
        same = same and all(
            abs(a["train_loss"] - b["train_loss"]) <= 1e-4 * max(1.0, abs(b["train_loss"]))
            for a, b in zip(cached.history, recompute.history, strict=True))
        print(f"{name}_round round={round_ + 1} cached_epoch_s={fmt(cached_s)} "
              f"recompute_epoch_s={fmt(recompute_s)} load1={load()}", flush=True)
    cached_epoch = statistics.mean(cached_timed)
    recompute_epoch = statistics.mean(recompute_timed)
    cached_best, recompute_best = min(cached_timed), min(recompute_timed)
    print(f"{name} cached_epoch_s={cached_epoch:.4f} recompute_epoch_s={recompute_epoch:.4f} "
          f"speedup={recompute_epoch / cached_epoch:.1f} "
          f"cached_img_s={per_epoch / cached_epoch:.0f} "
          f"recompute_img_s={per_epoch / recompute_epoch:.1f} "
          f"img_s_ratio={recompute_epoch / cached_epoch:.1f} "
          f"cached_best_epoch_s={cached_best:.4f} recompute_best_epoch_s={recompute_best:.4f} "
          f"best_speedup={recompute_best / cached_best:.1f} same_train_loss={same} "
          f"images={n} epochs={args.epochs} repeats={args.repeats} "
          f"image_size={args.image_size} batch_size={args.batch_size} "
          f"threads={torch.get_num_threads()} load1_before={load_before} load1_after={load()}",
          flush=True)


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as tmp:
        if not args.skip_full:
            full_finetune(args, image_folder(Path(tmp) / "full", args.images), args.images)
        if not args.skip_head:
            head_only(args, image_folder(Path(tmp) / "head", args.head_images), args.head_images)
        if not args.skip_top:
            top_stages(args, image_folder(Path(tmp) / "top", args.images), args.images)
    print(f"train_throughput total_s={time.perf_counter() - started:.1f}")


if __name__ == "__main__":
    main()
