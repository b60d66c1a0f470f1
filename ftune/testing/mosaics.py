"""A multi-label image set built honestly from real images: 2×2 mosaics whose tiles are real
animal silhouettes (animal-mnist) and handwritten digits (scikit-learn's digits), each mosaic
labelled with the set of classes its tiles show. No real multi-label set ships in a package
here; tiles of the training mosaics come only from the training pool and those of the test
mosaics only from the test pool, so nothing is seen on both sides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ftune.testing.realdata import ANIMAL_CLASSES, animal_mnist_arrays

TILE = 28
DIGIT_CLASSES = [f"digit{i}" for i in range(10)]


def tile_pools(test_share: float = 0.25, seed: int = 0
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Real tiles (28×28 grey) and class indices into ``ANIMAL_CLASSES + DIGIT_CLASSES``,
    split once into disjoint ``train`` and ``test`` pools."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    animals, animal_labels = animal_mnist_arrays()
    digits = load_digits()
    digit_tiles = np.stack([
        np.asarray(Image.fromarray((d * (255 / 16)).astype(np.uint8)).resize(
            (TILE, TILE), Image.Resampling.BICUBIC)) for d in digits.images])
    tiles = np.concatenate([animals, digit_tiles])
    labels = np.concatenate([animal_labels, digits.target + len(ANIMAL_CLASSES)])
    order = np.random.default_rng(seed).permutation(len(tiles))
    cut = int(len(order) * test_share)
    return {"test": (tiles[order[:cut]], labels[order[:cut]]),
            "train": (tiles[order[cut:]], labels[order[cut:]])}


def mosaic(pool: tuple[np.ndarray, np.ndarray], rng: np.random.Generator
           ) -> tuple[np.ndarray, set[int]]:
    """One 56×56 mosaic: 1 to 4 of its tiles filled with real images, the rest left empty."""
    tiles, labels = pool
    canvas = np.zeros((2 * TILE, 2 * TILE), dtype=np.uint8)
    present: set[int] = set()
    filled = rng.choice(4, size=int(rng.integers(1, 5)), replace=False)
    for slot in filled:
        pick = int(rng.integers(len(tiles)))
        row, col = divmod(int(slot), 2)
        canvas[row * TILE:(row + 1) * TILE, col * TILE:(col + 1) * TILE] = tiles[pick]
        present.add(int(labels[pick]))
    return canvas, present


def write_mosaics(root: Path, counts: dict[str, int], seed: int = 0,
                  pools: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
    """``counts`` mosaics per split (``train``, ``test``) as images under ``root`` and a
    ``labels.csv`` (``path,labels,split``, labels joined by ``;``)."""
    pools = pools or tile_pools()
    classes = ANIMAL_CLASSES + DIGIT_CLASSES
    rng = np.random.default_rng(seed)
    rows = ["path,labels,split"]
    for split, count in counts.items():
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, present = mosaic(pools[split], rng)
            Image.fromarray(image).save(folder / f"{i:05d}.png")
            names = ";".join(classes[c] for c in sorted(present))
            rows.append(f"{split}/{i:05d}.png,{names},{split}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def only(pools: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[int]
         ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The pools' tiles of these classes alone (a small, quick set for tests)."""
    kept = {}
    for split, (tiles, labels) in pools.items():
        mask = np.isin(labels, classes)
        kept[split] = (tiles[mask], labels[mask])
    return kept
