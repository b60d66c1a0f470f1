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


def iterative_split(
    label_sets: list[tuple[int, ...]], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices for train and val of multi-label images, each class spread in proportion.

    Iterative stratification (Sechidis, Tsoumakas and Vlahavas, "On the Stratification of
    Multi-label Data", ECML PKDD 2011): take the class with the fewest images still to place,
    and give each of its images to the split that most lacks that class (then the split that
    lacks the most images). Rare classes are placed first, while there is still room for
    them. Images without labels fill what each split still lacks. Every class keeps at least
    one training image."""
    rng = random.Random(seed)
    fractions = {"train": 1 - val_fraction, "val": val_fraction}
    wanted = {split: len(label_sets) * share for split, share in fractions.items()}
    by_class: dict[int, list[int]] = {}
    for index, labels in enumerate(label_sets):
        for label in labels:
            by_class.setdefault(label, []).append(index)
    wanted_of = {split: {label: len(indices) * share for label, indices in by_class.items()}
                 for split, share in fractions.items()}
    placed: dict[int, str] = {}
    unplaced = {label: len(indices) for label, indices in by_class.items()}
    while unplaced:
        label = min(unplaced, key=lambda c: (unplaced[c], c))
        images = [i for i in by_class[label] if i not in placed]
        rng.shuffle(images)
        for index in images:
            split = max(fractions, key=lambda s: (wanted_of[s][label], wanted[s], rng.random()))
            placed[index] = split
            wanted[split] -= 1
            for other in label_sets[index]:
                wanted_of[split][other] -= 1
                unplaced[other] -= 1
        unplaced = {c: n for c, n in unplaced.items() if n > 0}
    rest = [i for i in range(len(label_sets)) if i not in placed]
    rng.shuffle(rest)
    for index in rest:
        split = max(fractions, key=lambda s: (wanted[s], rng.random()))
        placed[index] = split
        wanted[split] -= 1
    _keep_each_class_in_train(placed, by_class)
    train = sorted(i for i, split in placed.items() if split == "train")
    return train, sorted(i for i, split in placed.items() if split == "val")


def _keep_each_class_in_train(placed: dict[int, str], by_class: dict[int, list[int]]) -> None:
    for indices in by_class.values():
        if all(placed[i] == "val" for i in indices):
            placed[min(indices)] = "train"
