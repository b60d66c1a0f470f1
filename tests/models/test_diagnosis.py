"""The diagnosis: each finding from a real tiny run where that is cheap to provoke, from a
constructed history where it is not; a healthy run has none."""

from __future__ import annotations

import math

import pytest

from ftune.models.diagnosis import diagnose
from ftune.models.errors import NonFiniteLossError
from ftune.models.training.fit import fit

HEAD_ONLY = {"image_size": 32, "batch_size": 8, "freeze": {"strategy": "head_only"},
             "augment": "none", "class_weights": "none"}


def _codes(findings: list[dict]) -> set[str]:
    return {f["code"] for f in findings}


def _row(epoch: int, train_loss: float, val_loss: float | None = None, *,
         train_accuracy: float = 0.5, val_accuracy: float = 0.5, grad_norm: float = 1.0,
         stages: dict | None = None, stage: str = "train") -> dict:
    return {"epoch": epoch, "stage": stage, "train_loss": train_loss, "val_loss": val_loss,
            "train_accuracy": train_accuracy, "val_accuracy": val_accuracy,
            "grad_norm": grad_norm, "stage_grad_norms": stages or {"head": grad_norm}}


def test_a_healthy_run_has_no_findings(animal_folder):
    result = fit(animal_folder, {"preset": "fast", "image_size": 64})
    assert result.diagnosis == []
    assert result.evaluation["val"]["accuracy"] > 0.7


def test_a_learning_rate_far_too_high_is_diagnosed_as_diverging(tiny_folder):
    spec = {**HEAD_ONLY, "epochs": 4, "optimizer": {"name": "sgd", "lr": 5.0, "momentum": 0.9},
            "early_stopping": {"patience": 10}}
    try:
        findings = fit(tiny_folder, spec).diagnosis
    except NonFiniteLossError as exc:  # the service diagnoses the failed job from its error
        findings = diagnose([], num_classes=3, error=str(exc))
    assert _codes(findings) & {"diverging", "unstable", "exploding_gradients"}
    assert all(f["evidence"] and f["action"] for f in findings)
    assert any("lr" in f["action"] for f in findings)


def test_a_learning_rate_far_too_low_is_diagnosed_as_no_progress(tiny_folder):
    spec = {**HEAD_ONLY, "epochs": 2, "optimizer": {"name": "sgd", "lr": 1e-7}}
    findings = fit(tiny_folder, spec).diagnosis
    assert "no_progress" in _codes(findings)
    (finding,) = [f for f in findings if f["code"] == "no_progress"]
    assert f"{math.log(3):.3g}" in finding["evidence"]


def test_a_big_head_without_dropout_on_few_images_is_diagnosed_as_overfitting(tiny_folder):
    spec = {**HEAD_ONLY, "epochs": 40, "head": {"hidden": [512], "dropout": 0.0},
            "optimizer": {"name": "adam", "lr": 0.01}, "early_stopping": {"patience": 40},
            "val_fraction": 0.34}
    result = fit(tiny_folder, spec)
    assert "overfitting" in _codes(result.diagnosis), result.history[-1]


def test_a_non_finite_loss_error_is_a_divergence():
    findings = diagnose([], num_classes=10, error="loss became nan at step 3 of the epoch")
    assert _codes(findings) == {"diverging"}


def test_a_loss_far_above_guessing_is_a_divergence_not_a_lack_of_progress():
    # lr 5 on 3 classes: the loss ends lower than it began, but far above ln 3 = 1.1.
    thrashing = [_row(1, 9.25), _row(2, 4.69), _row(3, 5.6), _row(4, 2.45)]
    findings = diagnose(thrashing, num_classes=3)
    assert _codes(findings) == {"diverging"}
    assert "8.4x the 1.1 of guessing" in findings[0]["evidence"]
    stuck = [_row(1, 1.12), _row(2, 1.1)]  # lr far too low: at the loss of guessing
    assert _codes(diagnose(stuck, num_classes=3)) == {"no_progress"}


def test_unstable_loss_is_judged_within_a_stage_only():
    # A fine-tuning stage starts higher than the head stage ended: not instability.
    staged = [_row(1, 1.0, stage="head"), _row(2, 0.1, stage="head"),
              _row(3, 0.5, stage="finetune"), _row(4, 0.3, stage="finetune")]
    assert diagnose(staged, num_classes=2) == []
    jumping = [_row(1, 1.0), _row(2, 0.2), _row(3, 0.9)]
    assert "unstable" in _codes(diagnose(jumping, num_classes=2))


def test_vanishing_gradients_in_the_earliest_trained_stage():
    stages = {"head": 2.0, "stage6": 0.5, "stage4": 1e-5}
    history = [_row(1, 0.9, 0.9, stages=stages), _row(2, 0.5, 0.6, stages=stages)]
    (finding,) = diagnose(history, num_classes=2)
    assert finding["code"] == "vanishing_gradients" and "stage4" in finding["evidence"]
    healthy = {"head": 2.0, "stage6": 0.5, "stage4": 0.05}
    assert diagnose([_row(1, 0.4, 0.4, stages=healthy)], num_classes=2) == []


def test_exploding_gradient_norms():
    history = [_row(1, 0.6, 0.6, grad_norm=2.0), _row(2, 0.5, 0.55, grad_norm=80.0)]
    (finding,) = diagnose(history, num_classes=2)
    assert finding["code"] == "exploding_gradients" and "grad_clip_norm" in finding["action"]


def test_early_stopping_at_the_first_epoch():
    history = [_row(1, 0.5, 0.4), _row(2, 0.45, 0.5), _row(3, 0.44, 0.52)]
    findings = diagnose(history, num_classes=2, stopped_early=True, best_epoch=1)
    assert _codes(findings) == {"early_stop_epoch_1"}
    assert diagnose(history, num_classes=2, stopped_early=True, best_epoch=2) == []


@pytest.mark.parametrize(("weights", "advice"), [("none", "class_weights balanced"),
                                                 ("balanced", "Add images")])
def test_class_imbalance_hurting_recall(weights, advice):
    evaluation = {"val": {"per_class": [{"class": "big", "recall": 0.95},
                                        {"class": "rare", "recall": 0.2}]}}
    findings = diagnose([_row(1, 0.3, 0.3)], num_classes=2, evaluation=evaluation,
                        class_counts={"big": 200, "rare": 20}, class_weights=weights)
    (finding,) = findings
    assert finding["code"] == "imbalance_hurts_recall" and "rare" in finding["evidence"]
    assert advice in finding["action"]
    balanced = diagnose([_row(1, 0.3, 0.3)], num_classes=2, evaluation=evaluation,
                        class_counts={"big": 20, "rare": 20})
    assert balanced == []


def test_fine_tuning_that_never_beat_the_head_is_reported_with_its_cost():
    history = [_row(1, 0.9, 0.6, stage="head"), _row(2, 0.5, 0.4, stage="head"),
               *[_row(e, 0.4, 0.5, stage="finetune") for e in (3, 4, 5)]]
    for row in history[2:]:
        row["seconds"] = 20.0
    findings = diagnose(history, num_classes=2, best_epoch=2)
    found = next(f for f in findings if f["code"] == "finetune_no_gain")
    assert "epoch 2 (head)" in found["evidence"] and "3 epoch(s), 60 s" in found["evidence"]
    assert "preset fast" in found["action"].lower()
    # Fine-tuning whose epoch is the best: nothing to report.
    assert "finetune_no_gain" not in _codes(diagnose(history, num_classes=2, best_epoch=4))
