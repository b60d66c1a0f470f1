"""Evaluate a multi-label model: mean average precision, F1 at each class's threshold, the
label pairs it mixes up, the files it gets most wrong, and precision-recall curves."""

from __future__ import annotations

import torch

from ftune.models.confusion_pairs import most_confused
from ftune.models.tasks import average_precision

WORST_EXAMPLES = 20
CURVE_POINTS = 50  # per class, enough to draw the precision-recall curve


def summarize(probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor,
              classes: list[str], names: list[str], ranking: torch.Tensor | None = None) -> dict:
    """Every metric of the evaluation from calibrated probabilities, 0/1 targets and each
    class's decision threshold. ``ranking``: scores in the probabilities' order that do not
    saturate (the calibrated logits), for average precision and the curves; a sigmoid rounds
    many of them to exactly 0 or 1 in float32, which would tie images the model ranks."""
    ranking = probs if ranking is None else ranking
    n = len(targets)
    if n == 0:
        return {"num_images": 0}
    truth = targets.bool()
    predicted = probs >= thresholds[None, :]
    per_class = _per_class(ranking, truth, predicted, classes)
    aps = [row["average_precision"] for row in per_class if row["average_precision"] is not None]
    f1s = [row["f1"] for row in per_class if row["support"] and row["f1"] is not None]
    tp = int((predicted & truth).sum())
    fp, fn = int((predicted & ~truth).sum()), int((~predicted & truth).sum())
    losses = torch.nn.functional.binary_cross_entropy(
        probs.clamp(1e-7, 1 - 1e-7), targets.float(), reduction="none").sum(1)
    return {
        "num_images": n,
        "mean_average_precision": sum(aps) / len(aps) if aps else None,
        "micro_f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
        "macro_f1": sum(f1s) / len(f1s) if f1s else None,
        "exact_match": float((predicted == truth).all(1).float().mean()),
        "label_accuracy": float((predicted == truth).float().mean()),
        "loss": float(losses.mean()),
        "per_class": per_class,
        "most_confused": _most_confused(truth, predicted, classes),
        "worst": _worst(losses, truth, predicted, probs, classes, names),
        "pr_curves": {c: _curve(ranking[:, i], truth[:, i]) for i, c in enumerate(classes)},
    }


def _per_class(ranking: torch.Tensor, truth: torch.Tensor, predicted: torch.Tensor,
               classes: list[str]) -> list[dict]:
    rows = []
    for i, name in enumerate(classes):
        tp = int((predicted[:, i] & truth[:, i]).sum())
        support, said = int(truth[:, i].sum()), int(predicted[:, i].sum())
        precision = tp / said if said else None
        recall = tp / support if support else None
        f1 = None if not support else 2 * tp / (support + said)
        rows.append({"class": name, "average_precision": average_precision(ranking[:, i],
                                                                           truth[:, i]),
                     "precision": precision, "recall": recall, "f1": f1, "support": support})
    return rows


def _most_confused(truth: torch.Tensor, predicted: torch.Tensor,
                   classes: list[str]) -> list[dict]:
    """Pairs (a label missed, another said instead) on the same images, most frequent first:
    the multi-label form of a confusion between two classes."""
    missed = (truth & ~predicted).float()
    wrongly = (predicted & ~truth).float()
    return most_confused(missed.T @ wrongly, classes)  # [true, said]


def _worst(losses: torch.Tensor, truth: torch.Tensor, predicted: torch.Tensor,
           probs: torch.Tensor, classes: list[str], names: list[str]) -> list[dict]:
    """The files with the highest loss, with their misses and false positives."""
    rows = []
    for i in losses.argsort(descending=True)[:WORST_EXAMPLES].tolist():
        rows.append({
            "path": names[i], "loss": round(float(losses[i]), 6),
            "true": [classes[c] for c in truth[i].nonzero().flatten().tolist()],
            "missed": [classes[c] for c in (truth[i] & ~predicted[i]).nonzero().flatten().tolist()],
            "false_positives": [{"label": classes[c], "score": round(float(probs[i, c]), 6)}
                                for c in (predicted[i] & ~truth[i]).nonzero().flatten().tolist()],
        })
    return rows


def _curve(scores: torch.Tensor, truth: torch.Tensor) -> list[list[float]]:
    """[recall, precision] points down the ranking, thinned to about ``CURVE_POINTS``."""
    total = int(truth.sum())
    if total == 0:
        return []
    ranked = truth[scores.argsort(descending=True, stable=True)].float()
    found = ranked.cumsum(0)
    precision = found / torch.arange(1, len(ranked) + 1)
    recall = found / total
    step = max(1, len(ranked) // CURVE_POINTS)
    keep = list(range(0, len(ranked), step))
    if keep[-1] != len(ranked) - 1:
        keep.append(len(ranked) - 1)
    return [[round(float(recall[k]), 4), round(float(precision[k]), 4)] for k in keep]
