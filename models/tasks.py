"""What differs between single-label and multi-label classification, in one table.

Single-label: one class per image, softmax outputs, cross-entropy, targets are class indices.
Multi-label: a set of labels per image (possibly empty), one sigmoid output per class, binary
cross-entropy, targets are 0/1 rows. Everything else (stages, caching, early stopping,
checkpoints) is shared: it reaches the task through ``TASKS`` or ``task_of``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ftune.models.data.layout import MULTI_LABEL, SINGLE_LABEL
from ftune.models.data.split import iterative_split, stratified_split

if TYPE_CHECKING:
    from ftune.models.data.discover import Sample

POS_WEIGHT_CAP = 10.0  # a label on 1 image in 1,000 must not swamp the loss


class Task(ABC):
    name: ClassVar[str]
    metric: ClassVar[str]  # the validation metric that ranks models of this task

    @abstractmethod
    def targets(self, samples: Sequence[Sample], num_classes: int) -> torch.Tensor:
        ...

    @abstractmethod
    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        ...

    @abstractmethod
    def loss(self, weights: torch.Tensor | None, label_smoothing: float) -> nn.Module:
        ...

    @abstractmethod
    def hits(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Right decisions in a batch and how many decisions were made."""
        ...

    @abstractmethod
    def balanced_weights(self, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
        ...

    @abstractmethod
    def split(self, samples: Sequence[Sample], val_fraction: float, seed: int
              ) -> tuple[list[int], list[int]]:
        ...

    def class_counts(self, samples: Sequence[Sample], classes: list[str]) -> dict[str, int]:
        """Training images of each class (multi-label: the images carrying it)."""
        counts = dict.fromkeys(classes, 0)
        for sample in samples:
            for label in labels_of(sample):
                counts[classes[label]] += 1
        return counts


class SingleLabel(Task):
    name, metric = SINGLE_LABEL, "val_accuracy"

    def targets(self, samples: Sequence[Sample], num_classes: int) -> torch.Tensor:
        return torch.tensor([s.label for s in samples], dtype=torch.long)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=1)

    def loss(self, weights: torch.Tensor | None, label_smoothing: float) -> nn.Module:
        return nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)

    def hits(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        return (logits.argmax(1) == targets).sum(), int(targets.shape[0])

    def balanced_weights(self, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
        """n / (C * n_c) per class: every class weighs the same in the loss."""
        counts = torch.bincount(targets, minlength=num_classes).clamp(min=1).float()
        return len(targets) / (num_classes * counts)

    def split(self, samples: Sequence[Sample], val_fraction: float, seed: int
              ) -> tuple[list[int], list[int]]:
        return stratified_split([s.label for s in samples], val_fraction, seed)


class MultiLabel(Task):
    name, metric = MULTI_LABEL, "val_map"

    def targets(self, samples: Sequence[Sample], num_classes: int) -> torch.Tensor:
        rows = torch.zeros((len(samples), num_classes), dtype=torch.float32)
        for i, sample in enumerate(samples):
            rows[i, list(labels_of(sample))] = 1.0
        return rows

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())

    def loss(self, weights: torch.Tensor | None, label_smoothing: float) -> nn.Module:
        """Binary cross-entropy; ``weights`` weigh each class's positives. Label smoothing
        pulls the 0/1 targets towards 0.5 by that share."""
        bce = nn.BCEWithLogitsLoss(pos_weight=weights)
        return bce if not label_smoothing else _SmoothedBCE(bce, label_smoothing)

    def hits(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Each label of each image is a decision (at 0.5): the label-wise accuracy."""
        return ((logits > 0) == (targets > 0.5)).sum(), int(targets.numel())

    def balanced_weights(self, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
        """sqrt(negatives / positives) per class, at most ``POS_WEIGHT_CAP``: a rare label's
        positives count for more, without the full ratio's swing towards predicting it."""
        positives = targets.sum(0).clamp(min=1)
        negatives = (len(targets) - targets.sum(0)).clamp(min=1)
        return (negatives / positives).sqrt().clamp(1.0, POS_WEIGHT_CAP)

    def split(self, samples: Sequence[Sample], val_fraction: float, seed: int
              ) -> tuple[list[int], list[int]]:
        return iterative_split([labels_of(s) for s in samples], val_fraction, seed)


class _SmoothedBCE(nn.Module):
    def __init__(self, bce: nn.BCEWithLogitsLoss, smoothing: float) -> None:
        super().__init__()
        self.bce, self.smoothing = bce, smoothing
        self.weight = None  # as BCEWithLogitsLoss: no per-class weight on whole images

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.bce(logits, targets * (1 - self.smoothing) + self.smoothing / 2)


TASKS: dict[str, Task] = {SINGLE_LABEL: SingleLabel(), MULTI_LABEL: MultiLabel()}


def labels_of(sample: Sample) -> tuple[int, ...]:
    """The sample's classes: its one label, or its set (unlabelled: none)."""
    if sample.targets is not None:
        return sample.targets
    return (sample.label,) if sample.label >= 0 else ()


def task_of(targets: torch.Tensor) -> Task:
    """The task of a batch's targets: rows of 0/1 are multi-label, indices single-label."""
    return TASKS[MULTI_LABEL if targets.dim() == 2 else SINGLE_LABEL]


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float | None:
    """Area under one class's precision-recall curve as scikit-learn computes it: one step
    per distinct score (tied images are ranked together, whatever their order), the
    precision at each step weighted by the recall it adds; None without positives."""
    found = positives.bool()
    total = int(found.sum())
    if total == 0:
        return None
    order = scores.argsort(descending=True, stable=True)
    ranked, hits = scores[order], found[order].double().cumsum(0)
    # The last image of each run of equal scores: where the curve takes a step.
    ends = torch.cat([(ranked[1:] != ranked[:-1]).nonzero().flatten(),
                      torch.tensor([len(ranked) - 1])])
    precision = hits[ends] / (ends + 1).double()
    recall = hits[ends] / total
    gains = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
    return float((gains * precision).sum())


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Macro mAP over the classes with positives among ``targets``."""
    values = [average_precision(scores[:, c], targets[:, c]) for c in range(targets.shape[1])]
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None
