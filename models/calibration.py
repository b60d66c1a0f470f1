"""Probabilities people can trust: temperature scaling fitted on the validation split, and
each multi-label class's decision threshold.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017)
divides the logits by one number chosen to minimise the validation loss: the ranking, and so
the accuracy and mAP, are unchanged; only the confidence moves. A temperature is kept only
when it lowers the validation ECE. Multi-label models may get one temperature per class:
both forms are measured by fitting on one half of val and scoring on the other, and the
better one is fitted on all of val.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn import functional

from ftune.models.tasks import MultiLabel, Task

ECE_BINS = 15
MIN_VAL = 10  # fewer val images than this: no temperature is fitted (too noisy)


@dataclass
class Calibration:
    temperature: list[float]  # one (shared), or one per class; [1.0]: none kept
    kept: bool
    why: str
    val_ece_before: float | None = None
    val_ece_after: float | None = None
    thresholds: list[float] | None = None  # multi-label: each class's decision threshold
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"temperature": self.temperature, "kept": self.kept, "why": self.why,
                "val_ece_before": self.val_ece_before, "val_ece_after": self.val_ece_after,
                "thresholds": self.thresholds, "warnings": self.warnings}

    def scale(self, logits: torch.Tensor) -> torch.Tensor:
        return scaled(logits, self.temperature)


def scaled(logits: torch.Tensor, temperature: list[float]) -> torch.Tensor:
    t = torch.tensor(temperature, dtype=torch.float32, device=logits.device)
    return logits.float() / (t if len(temperature) > 1 else t[0])


def _confidence(probs: torch.Tensor, targets: torch.Tensor, task: Task
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-label: the top class's probability and whether it was right; multi-label:
    every (image, class) probability and whether the label is there."""
    if isinstance(task, MultiLabel):
        return probs.flatten(), targets.flatten().float()
    return probs.max(1).values, (probs.argmax(1) == targets).float()


def reliability(probs: torch.Tensor, targets: torch.Tensor, task: Task) -> list[dict]:
    """The reliability diagram's bins: how sure (mean confidence) against how often right,
    and how many predictions fall in each of ``ECE_BINS`` equal-width bins."""
    confidence, outcome = _confidence(probs, targets, task)
    bins = []
    for lo, hi in itertools.pairwise(torch.linspace(0, 1, ECE_BINS + 1).tolist()):
        in_bin = (confidence > lo) & (confidence <= hi) if lo > 0 else confidence <= hi
        count = int(in_bin.sum())
        bins.append({"from": round(lo, 4), "to": round(hi, 4), "count": count,
                     "confidence": float(confidence[in_bin].mean()) if count else None,
                     "accuracy": float(outcome[in_bin].mean()) if count else None})
    return bins


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, task: Task) -> float:
    """Mean gap between confidence and how often it is right, over equal-width bins,
    weighted by the predictions in each."""
    bins = reliability(probs, targets, task)
    total = sum(b["count"] for b in bins)
    return sum(abs(b["accuracy"] - b["confidence"]) * b["count"] / total
               for b in bins if b["count"])


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, task: Task, *,
                    per_class: bool = False) -> list[float]:
    """The temperature(s) minimising the validation loss (LBFGS on their logarithm)."""
    count = logits.shape[1] if per_class else 1
    log_t = torch.zeros(count, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100, line_search_fn="strong_wolfe")
    logits, loss_fn = logits.float().detach(), _loss_of(task)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        t = log_t.exp() if per_class else log_t.exp()[0]
        loss = loss_fn(logits / t, targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return [round(float(v), 6) for v in log_t.detach().exp().clamp(0.05, 20.0)]


def _loss_of(task: Task) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if isinstance(task, MultiLabel):
        return lambda z, y: functional.binary_cross_entropy_with_logits(z, y.float())
    return functional.cross_entropy


def calibrate(logits: torch.Tensor, targets: torch.Tensor, task: Task, seed: int = 0
              ) -> Calibration:
    """Fit on the validation logits; keep only what lowers the validation ECE."""
    if len(logits) < MIN_VAL:
        return _thresholds(Calibration([1.0], False, f"fewer than {MIN_VAL} validation images: "
                                       "too few to fit a temperature"), logits, targets, task)
    before = expected_calibration_error(task.probabilities(logits), targets, task)
    per_class = isinstance(task, MultiLabel) and _per_class_is_better(logits, targets, task,
                                                                       seed)
    temperature = fit_temperature(logits, targets, task, per_class=per_class)
    after = expected_calibration_error(task.probabilities(scaled(logits, temperature)),
                                       targets, task)
    form = "one per class" if per_class else "one shared"
    if after < before:
        result = Calibration(temperature, True, f"temperature scaling ({form}) lowered the "
                             f"validation ECE from {before:.4f} to {after:.4f}", before, after)
    else:
        result = Calibration([1.0], False, f"temperature scaling ({form}) did not lower the "
                             f"validation ECE ({before:.4f}, {after:.4f} with it): not kept",
                             before, before)
    return _thresholds(result, logits, targets, task)


def _per_class_is_better(logits: torch.Tensor, targets: torch.Tensor, task: Task,
                         seed: int) -> bool:
    """Fit each form on one half of val and score it on the other, both ways round."""
    order = torch.randperm(len(logits), generator=torch.Generator().manual_seed(seed))
    halves = (order[: len(order) // 2], order[len(order) // 2:])
    ece = {False: 0.0, True: 0.0}
    for fit_rows, score_rows in (halves, halves[::-1]):
        for per_class in ece:
            t = fit_temperature(logits[fit_rows], targets[fit_rows], task, per_class=per_class)
            probs = task.probabilities(scaled(logits[score_rows], t))
            ece[per_class] += expected_calibration_error(probs, targets[score_rows], task)
    return ece[True] < ece[False]


def _thresholds(result: Calibration, logits: torch.Tensor, targets: torch.Tensor,
                task: Task) -> Calibration:
    if isinstance(task, MultiLabel):
        probs = task.probabilities(scaled(logits, result.temperature))
        result.thresholds, missing = best_f1_thresholds(probs, targets)
        if missing:
            result.warnings.append(
                f"{len(missing)} class(es) have no positive in val and keep the threshold "
                f"0.5: {', '.join(str(c) for c in missing[:10])}")
    return result


def best_f1_thresholds(probs: torch.Tensor, targets: torch.Tensor
                       ) -> tuple[list[float], list[int]]:
    """Each class's threshold maximising its F1 on these images (midway between the
    deciding score and the next one down); classes without positives keep 0.5 and are
    returned as the second value."""
    thresholds, missing = [], []
    for c in range(targets.shape[1]):
        truth = targets[:, c].bool()
        total = int(truth.sum())
        if total == 0:
            thresholds.append(0.5)
            missing.append(c)
            continue
        scores, order = probs[:, c].sort(descending=True, stable=True)
        found = truth[order].float().cumsum(0)
        f1 = 2 * found / (torch.arange(1, len(scores) + 1) + total)
        best = int(f1.argmax())
        below = float(scores[best + 1]) if best + 1 < len(scores) else 0.0
        thresholds.append(round((float(scores[best]) + below) / 2, 6))
    return thresholds, missing
