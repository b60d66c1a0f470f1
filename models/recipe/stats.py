"""What the auto rules need to know about a dataset, computed once at upload (lint) or from
the folder by the engine. No torch here: the API resolves choices with it at submit."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetStats:
    class_counts: dict[str, int]  # training images per class
    median_short_side: int | None  # px; None when unknown (a dataset from an older release)
    median_size: tuple[int, int] | None = None  # (width, height) of the median image
    unlabeled: int = 0  # unlabelled images the job can use
    images: int | None = None  # training images; None: the class counts' sum (single-label)
    task: str = "single_label"  # or "multi_label": class_counts are each label's positives

    @property
    def num_train(self) -> int:
        return self.images if self.images is not None else sum(self.class_counts.values())

    @property
    def imbalance_ratio(self) -> float | None:
        counts = [n for n in self.class_counts.values() if n > 0]
        return max(counts) / min(counts) if counts else None


def size_summary(sizes: list[tuple[int, int]]) -> dict | None:
    """The image-size part of a lint report: median short side and the median image."""
    if not sizes:
        return None
    shorts = sorted(min(w, h) for w, h in sizes)
    return {"median_short_side": int(statistics.median_low(shorts)),
            "median_width": int(statistics.median_low(w for w, _ in sizes)),
            "median_height": int(statistics.median_low(h for _, h in sizes)),
            "min_short_side": shorts[0], "max_short_side": shorts[-1]}


def stats_from_report(report: dict | None, train_counts: dict[str, int],
                      unlabeled: int = 0) -> DatasetStats:
    sizes = (report or {}).get("image_sizes") or {}
    median = sizes.get("median_short_side")
    size = ((sizes["median_width"], sizes["median_height"])
            if "median_width" in sizes and "median_height" in sizes else None)
    return DatasetStats(dict(train_counts), int(median) if median else None, size, unlabeled)
