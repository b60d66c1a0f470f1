"""Evaluate a tuned model on a labelled split: the numbers a reviewer needs to trust it.

Single-label: accuracy, top-k accuracy, per-class precision/recall/F1 and support, the full
confusion matrix (every class), expected calibration error before and after calibration, the
most confused class pairs and the highest-loss examples by file name. Multi-label:
``models.multilabel_eval``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ftune.models import multilabel_eval
from ftune.models.calibration import Calibration, expected_calibration_error, reliability
from ftune.models.confusion_pairs import most_confused
from ftune.models.data.discover import Sample
from ftune.models.data.source import ImageSource
from ftune.models.data.transforms import normalize
from ftune.models.network import FineTuneModel
from ftune.models.preprocessing import Preprocessing
from ftune.models.tasks import MultiLabel, Task
from ftune.models.training.loop import stop_if_asked
from ftune.models.training.run_setup import RunSetup
from ftune.models.training.runtime import Precision, feature_batch_size

ECE_BINS = 15
WORST_EXAMPLES = 20


@torch.no_grad()
def predict_logits(model: nn.Module, source: ImageSource, prep: Preprocessing,
                   device: torch.device, precision: Precision, batch_size: int | None = None,
                   should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    model.eval()
    chunks = []
    for images, _, _ in source.batches(torch.arange(len(source)),
                                       batch_size or feature_batch_size(device)):
        stop_if_asked(should_stop)
        batch = normalize(images.to(device).float(), prep)
        with precision.autocast():
            chunks.append(model(batch).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def predict_probabilities(model: nn.Module, source: ImageSource, prep: Preprocessing,
                          device: torch.device, precision: Precision, batch_size: int | None = None,
                          should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Softmax probabilities (single-label models)."""
    logits = predict_logits(model, source, prep, device, precision, batch_size, should_stop)
    return torch.softmax(logits, dim=1) if logits.numel() else logits


def _ratio(numerator: float, denominator: float) -> float | None:
    return None if denominator == 0 else numerator / denominator


def summarize(probs: torch.Tensor, labels: torch.Tensor, classes: list[str],
              names: list[str]) -> dict:
    """Every metric of the evaluation from predicted probabilities and true labels."""
    n, c = len(labels), len(classes)
    if n == 0:
        return {"num_images": 0}
    predicted = probs.argmax(dim=1)
    confidence = probs.max(dim=1).values
    correct = predicted == labels
    k = min(5, c)
    in_top_k = (probs.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    confusion = torch.bincount(labels * c + predicted, minlength=c * c).reshape(c, c)
    per_class = _per_class(confusion, classes)
    f1s = [row["f1"] for row in per_class if row["support"] and row["f1"] is not None]
    losses = -torch.log(probs[torch.arange(n), labels].clamp_min(1e-12))
    return {
        "num_images": n,
        "accuracy": float(correct.float().mean()),
        "top_k": k,
        "top_k_accuracy": float(in_top_k.float().mean()),
        "loss": float(losses.mean()),
        "macro_f1": sum(f1s) / len(f1s) if f1s else None,
        "expected_calibration_error": _expected_calibration_error(confidence, correct),
        "per_class": per_class,
        "confusion_matrix": {"labels": classes, "rows_true_columns_predicted":
                             confusion.tolist()},
        "most_confused": most_confused(confusion, classes),
        "highest_loss": _highest_loss(losses, labels, predicted, confidence, classes, names),
    }


def _per_class(confusion: torch.Tensor, classes: list[str]) -> list[dict]:
    rows = []
    for i, name in enumerate(classes):
        tp = int(confusion[i, i])
        support, predicted_as = int(confusion[i].sum()), int(confusion[:, i].sum())
        precision, recall = _ratio(tp, predicted_as), _ratio(tp, support)
        f1: float | None
        if support == 0:
            f1 = None  # not in this split: left out of the macro average
        elif tp == 0:
            f1 = 0.0  # present but never found (precision may be undefined): it counts
        else:
            assert precision is not None and recall is not None  # tp > 0: both defined
            f1 = 2 * precision * recall / (precision + recall)
        rows.append({"class": name, "precision": precision, "recall": recall, "f1": f1,
                     "support": support})
    return rows


def _expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """Mean gap between confidence and accuracy over equal-width confidence bins."""
    n = len(confidence)
    edges = torch.linspace(0, 1, ECE_BINS + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            gap = (correct[in_bin].float().mean() - confidence[in_bin].mean()).abs()
            ece += float(gap) * int(in_bin.sum()) / n
    return ece


def _highest_loss(losses: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor,
                  confidence: torch.Tensor, classes: list[str], names: list[str]) -> list[dict]:
    return [{"path": names[i], "true": classes[int(labels[i])],
             "predicted": classes[int(predicted[i])],
             "confidence": round(float(confidence[i]), 6), "loss": round(float(losses[i]), 6)}
            for i in losses.argsort(descending=True)[:WORST_EXAMPLES].tolist()]


def split_logits(model: FineTuneModel, split: str, samples: list[Sample], setup: RunSetup,
                 root: Path, features: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits for a split's images, read as ``setup`` reads them (val from its val
    source, others decoded). ``features``: the images through the frozen backbone, in the
    split's order, when the model's backbone is that frozen one; then only the head runs."""
    if features is not None:
        model.eval()
        with torch.no_grad(), setup.precision.autocast():
            return model.head(features).float().cpu()
    return predict_logits(model, _source(split, samples, setup, root), setup.prep,
                          setup.precision.device, setup.precision,
                          should_stop=setup.should_stop)


def summarize_split(logits: torch.Tensor, samples: list[Sample], task: Task,
                    calibration: Calibration, *, classes: list[str], root: Path) -> dict:
    """A split's summary from its logits: metrics of the calibrated probabilities, and the
    ECE before calibration beside the one after."""
    targets = task.targets(samples, len(classes))
    names = [_relative(s.path, root) for s in samples]
    probs = task.probabilities(calibration.scale(logits))
    if isinstance(task, MultiLabel):
        thresholds = torch.tensor(calibration.thresholds or [0.5] * len(classes))
        summary = multilabel_eval.summarize(probs, targets, thresholds, classes, names,
                                            ranking=calibration.scale(logits))
        summary["expected_calibration_error"] = expected_calibration_error(probs, targets, task)
    else:
        summary = summarize(probs, targets, classes, names)
    if len(samples):
        raw = task.probabilities(logits)
        summary["expected_calibration_error_uncalibrated"] = expected_calibration_error(
            raw, targets, task)
        summary["reliability"] = {"uncalibrated": reliability(raw, targets, task),
                                  "calibrated": reliability(probs, targets, task),
                                  "temperature": calibration.temperature}
    return summary


def _source(split: str, samples: list[Sample], setup: RunSetup, root: Path) -> ImageSource:
    """Val images from the run's own val source; others from the decoded store (if any)."""
    if split == "val":
        return setup.val_source
    prep = setup.prep
    return ImageSource([s.path for s in samples], [s.label for s in samples], prep,
                       prep.input_size, decoded=setup.decoded, root=root)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name
