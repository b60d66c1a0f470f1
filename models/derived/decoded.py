"""Decoded, resized uint8 images of a whole dataset, kept on disk and memory-mapped.

Decoding dominates on real photos (a 3200x2400 JPEG costs ~100 ms at full scale), and every
job, trial and streaming epoch would pay it again. Here each image is decoded once per
dataset content and preprocessing, in parallel over the cores this process may use, into
one ``[N, 3, S, S]`` uint8 array that later jobs index without decoding anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ftune.models.data.images import decode_for
from ftune.models.data.transforms import resize_center_crop
from ftune.models.derived.store import DerivedStore
from ftune.models.preprocessing import Preprocessing

KIND = "decoded"
ARRAY, NAMES = "images.npy", "paths.json"


def decoded_key(content_hash: str, prep: Preprocessing, size: int, part: str = "all") -> str:
    """Same images (the dataset's ``part``: all, or those trained on), same preprocessing,
    same size: the same key."""
    recipe = json.dumps([prep.to_dict(), size], sort_keys=True)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    return f"{content_hash[:32]}-{size}px-{digest}" + ("" if part == "all" else f"-{part}")


def decode_workers() -> int:
    """The cores this process may run on (a worker pinned to some gets only those)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class DecodedImages:
    """The memory-mapped array, and which row holds which image (by path under the root)."""

    def __init__(self, folder: Path, key: str) -> None:
        # The store's key (not the folder's name, which may carry its owner's tag): what
        # later entries derived from these images extend.
        self.key = key
        self.array = np.load(folder / ARRAY, mmap_mode="r")
        self._rows = {name: row for row, name in enumerate(json.loads(
            (folder / NAMES).read_text()))}

    def rows(self, paths: list[Path], root: Path) -> torch.Tensor | None:
        """Row of each image, or None when one is missing (then it is decoded as usual)."""
        try:
            return torch.tensor([self._rows[p.relative_to(root).as_posix()] for p in paths],
                                dtype=torch.long)
        except (KeyError, ValueError):
            return None

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """The images of ``rows``, in that order, copied out of the map."""
        return torch.from_numpy(np.take(self.array, rows.numpy(), axis=0))


def _write(folder: Path, paths: list[Path], root: Path, prep: Preprocessing, size: int) -> None:
    array = np.lib.format.open_memmap(folder / ARRAY, mode="w+", dtype=np.uint8,
                                      shape=(len(paths), 3, size, size))

    def decode(row: int) -> None:
        image = decode_for(paths[row], prep.resize_size)
        array[row] = resize_center_crop(image, prep, size).numpy()

    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        list(pool.map(decode, range(len(paths))))  # PIL decodes without holding the GIL
    array.flush()
    (folder / NAMES).write_text(json.dumps([p.relative_to(root).as_posix() for p in paths]))


def decoded_images(store: DerivedStore, content_hash: str, paths: list[Path], root: Path,
                   prep: Preprocessing, size: int, owner: str | None = None,
                   part: str = "all") -> tuple[DecodedImages, bool]:
    """The decoded images at ``paths`` (the dataset's ``part``) from the store, decoding
    them first when absent (the owner's own entry unless the store is shared); True when
    they were decoded now."""
    key = decoded_key(content_hash, prep, size, part)
    return store.build_and_open(KIND, key, lambda tmp: _write(tmp, paths, root, prep, size),
                                lambda folder: DecodedImages(folder, key), owner)
