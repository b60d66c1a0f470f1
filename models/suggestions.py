"""Which unlabelled images to label next: the ones the model is least sure of, spread out.

Uncertainty alone picks many copies of one hard case (a batch of near-identical frames);
spread alone picks easy outliers. The ranking weighs both, as in weighted k-center greedy
(Sener and Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set
Approach", ICLR 2018, with uncertainty weights): each next image is the one that maximises
its uncertainty times its distance, in the frozen backbone's feature space, to the images
already picked; candidates come from the most uncertain ``POOL_FACTOR`` × count, and a
candidate closer than ``DUPLICATE_DISTANCE`` to a pick is a near-duplicate and never picked.

Uncertainty is of calibrated scores: single-label, the margin (1 − (p₁ − p₂), 1 when the top
two tie) or the entropy (normalised to [0, 1]); multi-label, how close each class's score is
to its decision threshold, averaged over the classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

POOL_FACTOR = 10
DUPLICATE_DISTANCE = 0.02  # cosine distance: the same picture re-encoded, resized, recropped
Measure = Literal["margin", "entropy"]


@dataclass(frozen=True)
class Pick:
    index: int  # into the candidates
    uncertainty: float  # in [0, 1]
    distance: float  # cosine distance to the nearest earlier pick (the first: 1.0)
    score: float  # uncertainty × distance when picked


def uncertainty(probs: torch.Tensor, *, measure: Measure = "margin",
                thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """Per image, in [0, 1] (1: least sure). ``thresholds``: a multi-label model's, one per
    class; then each class's score is compared with its own threshold."""
    probs = probs.double()
    if thresholds is not None:
        t = thresholds.double()[None, :]
        # 1 at the threshold, 0 at 0 or 1: the distance to it, scaled by the room on its side.
        room = torch.where(probs >= t, 1 - t, t).clamp(min=1e-12)
        return (1 - (probs - t).abs() / room).clamp(0, 1).mean(1).float()
    if probs.shape[1] < 2:
        return torch.zeros(len(probs))
    if measure == "entropy":
        entropy = -(probs * probs.clamp(min=1e-12).log()).sum(1)
        return (entropy / math.log(probs.shape[1])).clamp(0, 1).float()
    top2 = probs.topk(2, dim=1).values
    return (1 - (top2[:, 0] - top2[:, 1])).clamp(0, 1).float()


def pick_for_labelling(scores: torch.Tensor, features: torch.Tensor, count: int) -> list[Pick]:
    """Up to ``count`` candidates, best first (fewer when only near-duplicates remain):
    ``scores`` are their uncertainties, ``features`` their frozen-backbone features."""
    if count <= 0 or len(scores) == 0:
        return []
    pool = scores.argsort(descending=True, stable=True)[:max(count, POOL_FACTOR * count)]
    u = scores[pool].double()
    unit = torch.nn.functional.normalize(features[pool].double(), dim=1)
    nearest = torch.full((len(pool),), 1.0, dtype=torch.float64)  # to the picks so far
    taken = torch.zeros(len(pool), dtype=torch.bool)
    picks: list[Pick] = []
    while len(picks) < count:
        weighted = torch.where(taken | (nearest < DUPLICATE_DISTANCE),
                               torch.tensor(-1.0, dtype=torch.float64), u * nearest)
        best = int(weighted.argmax())
        if weighted[best] < 0:
            break  # only picks and their near-duplicates are left
        picks.append(Pick(int(pool[best]), float(u[best]), float(nearest[best]),
                          float(weighted[best])))
        taken[best] = True
        distance = (1 - unit @ unit[best]).clamp(min=0)
        nearest = torch.minimum(nearest, distance)
    return picks
