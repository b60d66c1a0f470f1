"""Probabilities people can trust: temperature scaling fitted on the validation split, and
each multi-label class's decision threshold.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017)
divides the logits by one number chosen to minimise the validation loss: the ranking, and so
the accuracy and mAP, are unchanged; only the confidence moves. Whether it helps is measured
on images it was not fitted on: fitted on one half of val and scored on the other, both ways
round; it is kept (fitted on all of val) only when it lowers that ECE and also the log loss on
each half. ECE over 15 bins is noisy on a few hundred images: alone, it let a well-calibrated
model's fitted temperature through about one time in three; the log loss, a proper scoring
rule, falls on both halves far less often by chance (measured on simulated calibrated and
over-confident models in tests/models/test_multilabel_training.py). Multi-label models may
get one temperature per class, chosen the same way. A model with fewer than 3 mistakes on val
gets none: its loss only falls as it grows surer.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn import functional

from ftune.models.tasks import MultiLabel, Task

ECE_BINS = 15
MIN_VAL = 10  # fewer val images than this: no temperature is fitted (too noisy)
MIN_MISTAKES = 3  # fewer val mistakes than this: nothing to calibrate against
TEMPERATURE_RANGE = (0.25, 10.0)  # beyond, a fit says more about the val set than the model


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
    return [round(float(v), 6) for v in log_t.detach().exp().clamp(*TEMPERATURE_RANGE)]


def _loss_of(task: Task) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if isinstance(task, MultiLabel):
        return lambda z, y: functional.binary_cross_entropy_with_logits(z, y.float())
    return functional.cross_entropy


def calibrate(logits: torch.Tensor, targets: torch.Tensor, task: Task, seed: int = 0,
              classes: list[str] | None = None) -> Calibration:
    """Fit on the validation logits; keep only what lowers the ECE on images it was not
    fitted on (each half of val, from a fit on the other half)."""
    result = _temperature(logits, targets, task, seed)
    return _thresholds(result, logits, targets, task, classes)


def _temperature(logits: torch.Tensor, targets: torch.Tensor, task: Task,
                 seed: int) -> Calibration:
    if len(logits) < MIN_VAL:
        return Calibration([1.0], False, f"fewer than {MIN_VAL} validation images: too few to "
                           "fit a temperature")
    mistakes = _mistakes(logits, targets, task)
    if mistakes < MIN_MISTAKES:
        # With (almost) no mistakes the loss only falls as the model grows surer: a fitted
        # temperature would make test mistakes at full confidence.
        return Calibration([1.0], False, f"{mistakes} mistake(s) on the {len(logits)} "
                           f"validation images (fewer than {MIN_MISTAKES}): too few to fit a "
                           "temperature against")
    halves = _halves(len(logits), seed)
    # Multi-label: one temperature per class or one shared, whichever the held-out ECE
    # prefers (shared on a tie); each form is scored once.
    scored = {per_class: _held_out(logits, targets, task, halves, per_class=per_class)
              for per_class in ((False, True) if isinstance(task, MultiLabel) else (False,))}
    per_class = min(scored, key=lambda form: _mean(scored[form])[1])
    scores = scored[per_class]
    (before, after), loss_fell = _mean(scores), all(h.loss_after < h.loss_before for h in scores)
    temperature = fit_temperature(logits, targets, task, per_class=per_class)
    form = "one per class" if per_class else "one shared"
    measured = (f"the validation ECE measured on each half of val with a fit on the other: "
                f"{before:.4f} without, {after:.4f} with")
    if after < before and loss_fell and all(math.isfinite(t) for t in temperature):
        return Calibration(temperature, True, f"temperature scaling ({form}) lowered {measured}"
                           ", and the log loss on each half", before, after)
    why = (f"did not lower {measured}" if after >= before else
           f"lowered {measured}, but not the log loss on each half: within the noise")
    return Calibration([1.0], False, f"temperature scaling ({form}) {why}; not kept",
                       before, before)


def _mistakes(logits: torch.Tensor, targets: torch.Tensor, task: Task) -> int:
    hits, decisions = task.hits(logits, targets)
    return decisions - int(hits)


def _halves(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: n // 2], order[n // 2:]


@dataclass
class HeldOut:
    """One half of val scored without and with the temperature fitted on the other half."""

    ece_before: float
    ece_after: float
    loss_before: float
    loss_after: float


def _held_out(logits: torch.Tensor, targets: torch.Tensor, task: Task,
              halves: tuple[torch.Tensor, torch.Tensor], *, per_class: bool) -> list[HeldOut]:
    scores, loss_fn = [], _loss_of(task)
    for fit_rows, score_rows in (halves, halves[::-1]):
        t = fit_temperature(logits[fit_rows], targets[fit_rows], task, per_class=per_class)
        raw, y = logits[score_rows].float(), targets[score_rows]
        scores.append(HeldOut(
            expected_calibration_error(task.probabilities(raw), y, task),
            expected_calibration_error(task.probabilities(scaled(raw, t)), y, task),
            float(loss_fn(raw, y)), float(loss_fn(scaled(raw, t), y))))
    return scores


def _mean(scores: list[HeldOut]) -> tuple[float, float]:
    """The held-out ECE without and with a temperature, over both halves."""
    return (sum(h.ece_before for h in scores) / len(scores),
            sum(h.ece_after for h in scores) / len(scores))


def _thresholds(result: Calibration, logits: torch.Tensor, targets: torch.Tensor,
                task: Task, classes: list[str] | None) -> Calibration:
    if not isinstance(task, MultiLabel):
        return result
    if not len(logits):
        result.thresholds = [0.5] * (len(classes) if classes else 0)
        result.warnings.append("no validation images: every class keeps the threshold 0.5")
        return result
    probs = task.probabilities(scaled(logits, result.temperature))
    result.thresholds, missing = best_f1_thresholds(probs, targets)
    if missing:
        names = [classes[c] if classes else str(c) for c in missing]
        result.warnings.append(
            f"{len(missing)} class(es) have no positive in val and keep the threshold 0.5: "
            f"{', '.join(names[:10])}{' …' if len(names) > 10 else ''}")
    return result


def best_f1_thresholds(probs: torch.Tensor, targets: torch.Tensor
                       ) -> tuple[list[float], list[int]]:
    """Each class's threshold maximising its F1 on these images: the lowest score it then
    says yes to (a class is present at or over its threshold; kept exact, so no rounding can
    move it past a score); classes without positives keep 0.5 and are returned as the
    second value."""
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
        thresholds.append(float(scores[int(f1.argmax())]))
    return thresholds, missing
