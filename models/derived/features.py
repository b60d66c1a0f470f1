"""Frozen backbone features of a whole dataset, kept on disk and memory-mapped, shared by
every job and sweep trial whose features would come out the same.

Features are a function of the decoded images (dataset content, preprocessing, input size:
the decoded entry's key) and of the backbone as built (architecture and pretrained weights)
and the numeric precision it runs in. Nothing else a spec sets changes them: learning rates,
heads, dropout, epochs, seeds and splits all differ freely between jobs that share an entry.
A randomly initialised backbone has no shared identity, so its features are never shared.
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


def features_key(decoded_key: str, backbone: str, precision: str) -> str:
    digest = hashlib.sha256(json.dumps([backbone, precision]).encode()).hexdigest()[:12]
    return f"{decoded_key}-{digest}"


class SharedFeatures:
    def __init__(self, folder: Path) -> None:
        self.array = np.load(folder / ARRAY, mmap_mode="r")

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.take(self.array, rows.numpy(), axis=0))


def shared_features(store: DerivedStore, decoded: DecodedImages, *, backbone: str,
                    precision: str, extract: Callable[[torch.Tensor], torch.Tensor],
                    batch_size: int, should_stop: Callable[[], None] | None = None,
                    owner: str | None = None) -> tuple[SharedFeatures, bool]:
    """The features of every decoded image, from the store or computed now with ``extract``
    (uint8 image batch -> float features, ``batch_size`` at a time); True when computed
    now."""

    def write(folder: Path) -> None:
        n = len(decoded.array)
        out = None
        for start in range(0, n, batch_size):
            if should_stop is not None:
                should_stop()
            rows = torch.arange(start, min(n, start + batch_size))
            chunk = extract(decoded.take(rows)).float().cpu().numpy()
            if out is None:
                out = np.lib.format.open_memmap(folder / ARRAY, mode="w+", dtype=np.float32,
                                                shape=(n, chunk.shape[1]))
            out[start:start + len(chunk)] = chunk
        if out is not None:
            out.flush()

    return store.build_and_open(KIND, features_key(decoded.key, backbone, precision), write,
                                SharedFeatures, owner)
