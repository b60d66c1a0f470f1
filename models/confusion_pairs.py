"""The most frequent pairs of a class-by-class count matrix: which true class a model most
often mistakes for which (single-label confusion, or a label missed while another was said)."""

from __future__ import annotations

import torch

CONFUSED_PAIRS = 10


def most_confused(counts: torch.Tensor, classes: list[str],
                  top: int = CONFUSED_PAIRS) -> list[dict]:
    """The ``top`` largest off-diagonal counts, most first; rows are true classes."""
    c = len(classes)
    off_diagonal = counts.clone()
    off_diagonal.fill_diagonal_(0)
    flat_counts = off_diagonal.flatten()
    pairs = []
    for flat in flat_counts.argsort(descending=True)[:top].tolist():
        count = int(flat_counts[flat])
        if count == 0:
            break
        pairs.append({"true": classes[flat // c], "predicted": classes[flat % c],
                      "count": count})
    return pairs
