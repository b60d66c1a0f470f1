"""Frozen backbone features of a whole dataset, kept on disk and memory-mapped, shared by
every job and sweep trial of the same owner (tenant) whose features would come out the same
(of any owner when the store is shared: see ``store.py``).

Features are a function of the decoded images (dataset content, preprocessing, input size:
the decoded entry's key) and of the backbone as built (architecture and pretrained weights)
and the numeric precision it runs in. Nothing else a spec sets changes them: learning rates,
heads, dropout, epochs, seeds and splits all differ freely between jobs that share an entry.
A randomly initialised backbone has no shared identity, so its features are never shared.

An entry holds a range of the decoded rows: the images a job trains and validates on (rows
first in every decoded array) in one, the held-out test images in another. Training needs only
the first; the second is computed when a head on the frozen backbone is evaluated on test, so a
job whose best weights fine-tuned the backbone never computes features of its test images.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ftune.models.derived.decoded import DecodedImages
from ftune.models.derived.store import DerivedStore

KIND = "features"
ARRAY = "features.npy"


def backbone_identity(name: str, weights_source: str | None) -> str | None:
    """What fixes a backbone's weights: its name and where they came from (a local file also
    by size and modification time); None for random weights."""
    if weights_source is None:
        return None
    identity = f"{name}|{weights_source}"
    path = Path(weights_source)
    if path.is_file():
        stat = path.stat()
        identity += f"|{stat.st_size}|{stat.st_mtime_ns}"
    return identity


def features_key(decoded_key: str, backbone: str, precision: str, rows: range) -> str:
    digest = hashlib.sha256(json.dumps([backbone, precision]).encode()).hexdigest()[:12]
    return f"{decoded_key}-{digest}-rows{rows.start}to{rows.stop}"


class SharedFeatures:
    """One entry: the features of decoded rows ``rows.start`` to ``rows.stop``."""

    def __init__(self, folder: Path, rows: range) -> None:
        self.array = np.load(folder / ARRAY, mmap_mode="r")
        self.rows = rows

    def covers(self, rows: torch.Tensor) -> bool:
        return bool(len(rows)) and self.rows.start <= int(rows.min()) and \
            int(rows.max()) < self.rows.stop

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """The features of decoded ``rows`` (all within this entry's range), in that order."""
        return torch.from_numpy(np.take(self.array, rows.numpy() - self.rows.start, axis=0))


def shared_features(store: DerivedStore, decoded: DecodedImages, rows: range, *, backbone: str,
                    precision: str, extract: Callable[[torch.Tensor], torch.Tensor],
                    batch_size: int, should_stop: Callable[[], None] | None = None,
                    owner: str | None = None) -> tuple[SharedFeatures, bool]:
    """The features of the decoded images in ``rows``, from the store or computed now with
    ``extract`` (uint8 image batch -> float features, ``batch_size`` at a time); True when
    computed now."""

    def write(folder: Path) -> None:
        out = None
        for start in range(rows.start, rows.stop, batch_size):
            if should_stop is not None:
                should_stop()
            batch = decoded.take(torch.arange(start, min(rows.stop, start + batch_size)))
            chunk = extract(batch).float().cpu().numpy()
            if out is None:
                out = np.lib.format.open_memmap(folder / ARRAY, mode="w+", dtype=np.float32,
                                                shape=(len(rows), chunk.shape[1]))
            out[start - rows.start:start - rows.start + len(chunk)] = chunk
        if out is not None:
            out.flush()

    return store.build_and_open(KIND, features_key(decoded.key, backbone, precision, rows),
                                write, lambda folder: SharedFeatures(folder, rows), owner)
