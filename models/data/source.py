"""Batches of uint8 images for one split: decoded once into memory, or streamed from disk.

Decoding and resizing every epoch competes with the model for the CPU; when the split fits the
memory budget (``FTUNE_DECODE_CACHE_MB``, default 4096) it is decoded once, in parallel threads,
and later epochs only index a tensor. Larger splits stream through DataLoader workers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset

from ftune.models.data.images import decode_for
from ftune.models.data.transforms import resize_center_crop
from ftune.models.preprocessing import Preprocessing

if TYPE_CHECKING:
    from ftune.models.derived.decoded import DecodedImages
from ftune.models.settings import engine_settings

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images uint8, labels, sample indices
BatchSizes = int | Sequence[int]  # one size for every batch, or each batch's own


def index_batches(order: torch.Tensor, sizes: BatchSizes) -> Iterator[torch.Tensor]:
    """``order`` cut into batches: ``sizes`` at a time, or of each of the given sizes."""
    if isinstance(sizes, int):
        for start in range(0, len(order), sizes):
            yield order[start:start + sizes]
        return
    start = 0
    for size in sizes:
        yield order[start:start + size]
        start += size


class _DecodeDataset(Dataset):
    def __init__(self, paths: Sequence[Path], prep: Preprocessing, size: int) -> None:
        self.paths, self.prep, self.size = paths, prep, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # A JPEG decodes at a reduced scale, no smaller than twice the resize target.
        image = decode_for(self.paths[index], self.prep.resize_size)
        return resize_center_crop(image, self.prep, self.size), index


class ImageSource:
    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | torch.Tensor,
        prep: Preprocessing,
        size: int,
        *,
        budget_bytes: int | None = None,
        num_workers: int | None = None,
        decoded: DecodedImages | None = None,
        root: Path | None = None,
    ) -> None:
        """``labels``: class indices, or a tensor of targets (multi-label: rows of 0/1).
        ``decoded``: the dataset's images already decoded at ``size`` (rows found by path
        under ``root``); then nothing is decoded here."""
        self.paths = list(paths)
        self.labels = (labels if isinstance(labels, torch.Tensor)
                       else torch.tensor(list(labels), dtype=torch.long))
        self.prep, self.size = prep, size
        self._dataset = _DecodeDataset(self.paths, prep, size)
        budget = engine_settings().decode_cache_bytes if budget_bytes is None else budget_bytes
        self.in_memory = len(self.paths) * 3 * size * size <= budget
        self._workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
        self._images: torch.Tensor | None = None
        rows = (decoded.rows(self.paths, root) if decoded is not None and root is not None
                and decoded.array.shape[-1] == size else None)
        # Both or neither: the decoded images and this source's rows in them.
        self._stored: DecodedImages | None = decoded if rows is not None else None
        self._stored_rows: torch.Tensor | None = rows

    @property
    def predecoded(self) -> bool:
        return self._stored is not None

    @property
    def stored_rows(self) -> torch.Tensor | None:
        """This split's rows in the dataset's decoded images (and in features derived from
        them), when it reads from them."""
        return self._stored_rows

    def __len__(self) -> int:
        return len(self.paths)

    def _decoded(self) -> torch.Tensor:
        if self._images is None:
            images = torch.empty((len(self.paths), 3, self.size, self.size), dtype=torch.uint8)

            def decode(index: int) -> None:
                images[index] = self._dataset[index][0]

            with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
                list(pool.map(decode, range(len(self.paths))))
            self._images = images
        return self._images

    def batches(
        self, order: torch.Tensor, batch_size: BatchSizes, *, pin: bool = False
    ) -> Iterator[Batch]:
        """Yield (images, labels, indices) in ``order``, ``batch_size`` at a time (or in
        batches of the given sizes: a rank's shards of the global batches)."""
        if self._stored is not None and self._stored_rows is not None:
            for idx in index_batches(order, batch_size):
                yield self._stored.take(self._stored_rows[idx]), self.labels[idx], idx
            return
        if self.in_memory:
            images = self._decoded()
            for idx in index_batches(order, batch_size):
                yield images[idx], self.labels[idx], idx
            return
        loader = DataLoader(
            self._dataset,
            batch_sampler=[idx.tolist() for idx in index_batches(order, batch_size)],
            num_workers=self._workers,
            pin_memory=pin,
            persistent_workers=False,
        )
        for images, idx in loader:
            yield images, self.labels[idx], idx
