"""How closely one engine's probabilities follow another's, and how good each is.

Single-label: the top class of each image; multi-label: its label set at the model's
thresholds. The quality an int8 model must keep is top-1 accuracy, or mAP for multi-label."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ftune.models.tasks import mean_average_precision


@dataclass(frozen=True)
class Agreement:
    images: int
    agreement: float  # share of images with the same answer
    max_prob_diff: float

    def to_dict(self) -> dict:
        return asdict(self)


def answers(probs: np.ndarray, thresholds: np.ndarray | None) -> np.ndarray:
    """Each image's answer: its top class, or (``thresholds`` given) its label set."""
    if thresholds is None:
        return probs.argmax(1)
    return probs >= thresholds[None, :]


def agreement(reference: np.ndarray, other: np.ndarray,
              thresholds: np.ndarray | None = None) -> Agreement:
    same = answers(reference, thresholds) == answers(other, thresholds)
    per_image = same if same.ndim == 1 else same.all(1)
    return Agreement(images=len(reference), agreement=float(per_image.mean()),
                     max_prob_diff=float(np.abs(reference - other).max()))


def quality(probs: np.ndarray, targets: np.ndarray, multi_label: bool) -> float | None:
    """Top-1 accuracy against class indices, or macro mAP against multi-hot targets."""
    if multi_label:
        return mean_average_precision(torch.from_numpy(probs), torch.from_numpy(targets))
    return float((probs.argmax(1) == targets).mean())
