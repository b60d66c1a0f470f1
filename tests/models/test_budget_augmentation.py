"""A time budget that cuts the fine-tuning stage below the epochs its augmentation needs
drops the augmentation (and re-times the stage without it); one the spec asked for stays."""

from __future__ import annotations

import time
from types import SimpleNamespace

from ftune.models.recipe.choices import Choices
from ftune.models.recipe.plan import plan_stages
from ftune.models.recipe.presets import PRESETS
from ftune.models.recipe.resolve import resolve_static
from ftune.models.recipe.stats import DatasetStats
from ftune.models.spec import parse_spec
from ftune.models.training.budget import RESERVE_SHARE, Budget
from ftune.models.training.early_stopping import EarlyStopping
from ftune.models.training.stages import Progress, StageRunner

# Seconds per fine-tuning epoch, as the probe would time them: augmentation runs every
# layer at every step, without it the frozen stages run once per image.
EPOCH_S = {"crop": 10.0, "none": 4.0}


class TimedRunner(StageRunner):
    """The stage runner with its one measurement, an epoch's timed cost, fixed."""

    def _epoch_seconds(self, plan) -> float:
        return EPOCH_S[plan.spec.augment]


def _finetune_plan(spec: dict, budget_s: float, choices: Choices | None = None):
    parsed = parse_spec(spec)
    choices = choices or Choices(resolve_static(parsed, DatasetStats({"a": 300, "b": 300}, 96)))
    plans = plan_stages(parsed, choices, num_stages=5)
    setup = SimpleNamespace(callbacks=None, choices=choices)
    progress = Progress(EarlyStopping("val_loss", patience=3), "val_loss")
    # RESERVE_SHARE of a budget is kept back: size it so that budget_s is what is left.
    budget = Budget(budget_s / (1 - RESERVE_SHARE) + 0.5, time.perf_counter())
    runner = TimedRunner(setup, plans, progress, budget, classes=["a", "b"], ckpt_dir=None)
    return runner._finetune_plan(plans[-1], resuming=False), choices


def test_a_budget_too_short_for_augmentation_drops_it_and_fits_more_epochs():
    preset = PRESETS["balanced"]
    assert preset.augment != "none" and preset.augment_from_epochs <= 8
    plan, choices = _finetune_plan({"epochs": 8}, budget_s=25)
    # Augmented, 2 epochs fit (fewer than the preset's minimum); plain, 6 do.
    assert plan is not None and plan.spec.augment == "none" and plan.spec.epochs == 6
    cut = choices.choice("finetune.augment")
    assert cut.value == "none" and "holds 2 fine-tuning epoch(s)" in cut.why
    assert choices.value("finetune.epochs") == 6


def test_a_budget_that_holds_enough_augmented_epochs_keeps_augmentation():
    plan, choices = _finetune_plan({"epochs": 8}, budget_s=75)
    assert plan is not None and plan.spec.augment == PRESETS["balanced"].augment
    assert plan.spec.epochs == 7 and "finetune.augment" not in choices


def test_augmentation_the_spec_asked_for_is_kept_whatever_the_budget():
    plan, choices = _finetune_plan({"epochs": 8, "augment": "crop"}, budget_s=25)
    assert plan is not None and plan.spec.augment == "crop" and plan.spec.epochs == 2
    assert "finetune.augment" not in choices


def test_a_restarted_run_keeps_the_cut_augmentation():
    _, choices = _finetune_plan({"epochs": 8}, budget_s=25)
    # A restart re-plans from the recorded choices (the preset's augmentation again)...
    again, _ = _finetune_plan({"epochs": 8}, budget_s=1000, choices=Choices(choices.to_dict()))
    # ...and the stage runs as first cut, whatever the budget left now.
    assert again is not None and (again.spec.augment, again.spec.epochs) == ("none", 6)
