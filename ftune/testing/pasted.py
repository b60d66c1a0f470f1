"""Images where the answer's place is known, for the pointing game: one real tile (an animal
silhouette or a handwritten digit, from ``mosaics.tile_pools``) enlarged and pasted at a
random place on a neutral grey canvas, labelled with the tile's class. The tile's box is
recorded, so an explanation's peak can be checked against it. Training images take their
tiles from the training pool only, test images from the test pool only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ftune.testing.mosaics import DIGIT_CLASSES, TILE, tile_pools
from ftune.testing.realdata import ANIMAL_CLASSES

CANVAS_GREY = 128


def pasted(tile: np.ndarray, canvas: int, scale: int, rng: np.random.Generator
           ) -> tuple[np.ndarray, list[int]]:
    """The tile, ``scale`` times larger, at a random place on a grey ``canvas`` square."""
    side = TILE * scale
    big = np.asarray(Image.fromarray(tile).resize((side, side), Image.Resampling.BICUBIC))
    image = np.full((canvas, canvas), CANVAS_GREY, dtype=np.uint8)
    x, y = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
    image[y:y + side, x:x + side] = big
    return image, [x, y, x + side, y + side]


def write_pasted(root: Path, classes: list[int], counts: dict[str, int], *, canvas: int = 160,
                 scale: int = 2, seed: int = 0) -> dict[str, list[int]]:
    """``counts`` images per split (``train``, ``test``) of the ``classes`` (indices into
    ``ANIMAL_CLASSES + DIGIT_CLASSES``) as ``root/<split>/<class>/NNNNN.png``. Returns each
    test image's tile box, ``[x0, y0, x1, y1]`` by its path relative to ``root``."""
    names = ANIMAL_CLASSES + DIGIT_CLASSES
    pools = tile_pools()
    rng = np.random.default_rng(seed)
    boxes: dict[str, list[int]] = {}
    for split, count in counts.items():
        tiles, labels = pools[split]
        candidates = np.flatnonzero(np.isin(labels, classes))
        for i in range(count):
            pick = int(candidates[rng.integers(len(candidates))])
            image, box = pasted(tiles[pick], canvas, scale, rng)
            relative = f"{split}/{names[int(labels[pick])]}/{i:05d}.png"
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / relative)
            if split == "test":
                boxes[relative] = box
    return boxes
