"""A stratified, seeded train/val split."""

from __future__ import annotations

import random


def stratified_split(
    labels: list[int], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices for train and val. Each class keeps at least one training image, and every
    class with two or more images puts at least one in val (when val_fraction > 0)."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        indices = by_class[label][:]
        rng.shuffle(indices)
        n_val = round(len(indices) * val_fraction) if val_fraction > 0 else 0
        if val_fraction > 0 and len(indices) >= 2:
            n_val = max(1, n_val)
        n_val = min(n_val, len(indices) - 1)
        val.extend(indices[:n_val])
        train.extend(indices[n_val:])
    return sorted(train), sorted(val)
