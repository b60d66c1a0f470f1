"""Training in stages: the learning-rate range test, then each planned stage in turn (the
head on cached features, then fine-tuning), sharing one model, one early-stopping record and
one history, within the time budget, with a checkpoint after every epoch."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ftune.models.auto_fields import decided
from ftune.models.network import reinit_head
from ftune.models.parallel import ranks
from ftune.models.recipe import rules
from ftune.models.recipe.choices import Choices
from ftune.models.recipe.plan import StagePlan, plan_stages, with_augment, with_epochs, with_lr
from ftune.models.recipe.presets import PRESETS
from ftune.models.spec import FineTuneSpec
from ftune.models.training.budget import Budget
from ftune.models.training.checkpoint import (
    checkpoint_folder,
    complete_weights,
    load_best_weights,
    restore_rng_state,
    rng_state,
    save_best_weights,
    save_checkpoint,
    weights_to_save,
)
from ftune.models.training.early_stopping import EarlyStopping
from ftune.models.training.lr_finder import lr_range_test
from ftune.models.training.run import TrainingRun
from ftune.models.training.run_setup import RunSetup

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where the epoch loop stands; restored from a checkpoint when resuming."""

    stopper: EarlyStopping
    monitor: str
    history: list[dict] = field(default_factory=list)
    first_epoch: int = 0  # within the stage being resumed
    stage_index: int = 0


PROBE_STEPS = 2  # timed training steps (after one untimed) to plan the fine-tuning epochs


def plan_with_lr(setup: RunSetup, spec: FineTuneSpec, *, resumed: bool
                 ) -> tuple[list[StagePlan], list[dict], TrainingRun | None]:
    """The stages with their learning rates: from the range test when the lr is auto (or
    from the recorded choices when resuming). Returns the plans, the test's curve, and the
    run whose feature cache the first stage can reuse."""
    choices = setup.choices
    plans = plan_stages(spec, choices, len(setup.backbone.stages))
    if spec.optimizer.lr != "auto":
        return plans, [], None
    if resumed:
        return _rates(plans, choices, choices.value("optimizer.lr")), [], None
    probe = TrainingRun(setup, with_lr(plans[0], 1e-3))
    features, labels = probe.cached_features("train")
    test = lr_range_test(setup.model.head, features, labels, loss_fn=probe.loss_fn,
                         batch_size=spec.batch_size, seed=spec.seed)
    # Every rank runs the test on the whole batch (the wall time of one doing it alone, with
    # nothing to send); rank 0's choice holds, should float noise make another's differ.
    head_lr = choices.record("optimizer.lr",
                             ranks.agree(rules.head_lr(test.suggested_lr, test.why())))
    return _rates(plans, choices, head_lr), test.curve, probe


def _rates(plans: list[StagePlan], choices: Choices, head_lr: float) -> list[StagePlan]:
    rated = []
    for plan in plans:
        if not plan.trains_backbone:
            rated.append(with_lr(plan, head_lr))
            continue
        lr = choices.record("finetune.lr" if plan.name == "finetune" else "optimizer.lr",
                            rules.finetune_lr(head_lr))
        rated.append(with_lr(plan, lr))
    return rated


class StageRunner:
    """Trains the planned stages in turn on ``setup``'s model; ``classes`` and ``ckpt_dir``
    are for the checkpoints (none without a folder)."""

    def __init__(self, setup: RunSetup, plans: list[StagePlan], progress: Progress,
                 budget: Budget, *, classes: list[str], ckpt_dir: Path | None) -> None:
        self.setup, self.plans, self.progress, self.budget = setup, plans, progress, budget
        self.classes, self.ckpt_dir = classes, ckpt_dir
        self.callbacks, self.choices = setup.callbacks, setup.choices
        self.best_state: dict | None = None
        self.best_run: TrainingRun | None = None  # the run whose epoch was the best so far
        self.stage_offset = 0  # history rows before the current stage
        self.out_of_time = False
        # No epoch has changed the backbone yet: checkpoints need only the head's weights.
        self.backbone_as_built = True
        self.writes = ranks.current().writes  # rank 0 alone writes checkpoints
        self.extra: dict = {}  # kept in every checkpoint too (a pseudo-labelling round's)

    def run_all(self, features_from: TrainingRun | None, state: dict | None
                ) -> tuple[TrainingRun, bool]:
        """Train every stage; returns the last stage's run and whether it stopped early."""
        first = state.get("stage_index", 0) if state else 0
        run, stopped_early = None, False
        for index, planned in enumerate(self.plans):
            if index < first:
                continue
            resumed = state if index == first else None  # the checkpoint of this stage
            plan = (self._finetune_plan(planned, resumed is not None)
                    if planned.name == "finetune" else planned)
            if plan is None:
                break
            if resumed is not None:
                self.stage_offset = resumed.get("stage_offset", 0)
            elif plan.fresh_head:
                reinit_head(self.setup.model.head, plan.spec.head, plan.spec.seed)
            run = TrainingRun(self.setup, plan, epoch_offset=self.stage_offset)
            if features_from is not None and run.backbone_frozen:
                run.adopt_features(features_from)
            self._begin(run, index, resumed)
            stopped_early = self._train_epochs(run, index)
            features_from, self.stage_offset = run, len(self.progress.history)
            if self.out_of_time:
                break
            if self.best_state is not None:  # the next stage starts from the best so far
                self.setup.model.load_state_dict(self.best_state)
        assert run is not None, "a plan has at least one stage"
        return run, stopped_early

    def another_pass(self, ckpt_dir: Path | None = None) -> StageRunner:
        """A runner for another pass of the same stages that continues this one: its best
        weights to beat, its history, its time budget (checkpointed in ``ckpt_dir``)."""
        again = StageRunner(self.setup, self.plans, self.progress, self.budget,
                            classes=self.classes, ckpt_dir=ckpt_dir)
        again.best_state, again.best_run = self.best_state, self.best_run
        again.backbone_as_built = self.backbone_as_built
        again.stage_offset = len(self.progress.history)  # epochs number on from there
        return again

    def _begin(self, run: TrainingRun, index: int, state: dict | None) -> None:
        progress, spec = self.progress, run.spec
        if state is not None and "model" in state:
            self._resume(run, state)
        else:
            progress.first_epoch, progress.stage_index = 0, index
            progress.stopper.patience = decided(spec.early_stopping.patience)
            progress.stopper.bad_epochs = 0
            if index > 0 and progress.monitor.startswith("train_"):
                # Without a val split the training loss is watched, and a stage that trains
                # more layers on augmented images starts higher: judge it on its own.
                progress.stopper.restart()
        if self.callbacks.on_stage is not None:
            # The epochs in all: this stage's and the later ones' as planned, so the total
            # does not jump when the next stage begins (it shrinks when one stops early).
            later = sum(decided(plan.spec.epochs) for plan in self.plans[index + 1:])
            self.callbacks.on_stage(run.stage, self.stage_offset + decided(spec.epochs) + later,
                                    decided(spec.epochs))

    def _resume(self, run: TrainingRun, state: dict) -> None:
        progress = self.progress
        # The best weights first, while the model still has the backbone as built: a
        # head-only save of them is completed with it.
        folder = checkpoint_folder(self.ckpt_dir) if self.ckpt_dir else None
        best = load_best_weights(folder) if folder else None
        self.best_state = complete_weights(run.model, best) if best is not None else None
        run.best_state = self.best_state
        self.backbone_as_built = state.get("backbone_as_built", False)
        self.setup.backbone_changed = not self.backbone_as_built
        run.model.load_state_dict(complete_weights(run.model, state["model"]))
        run.set_trainable(state["n_trainable"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scaler.load_state_dict(state["scaler"])
        run.step = state["step"]
        progress.first_epoch, progress.history = state["stage_epoch"], state["history"]
        progress.stage_index = state["stage_index"]
        progress.stopper.load_state_dict(state["early_stopping"])
        progress.stopper.patience = decided(run.spec.early_stopping.patience)
        restore_rng_state(state["rng"])
        log.info("resumed at epoch %d of stage %s", len(progress.history), run.stage)

    def _train_epochs(self, run: TrainingRun, index: int) -> bool:
        """The stage's remaining epochs; True when early stopping or the budget ended it."""
        progress, stopper = self.progress, self.progress.stopper
        epochs = decided(run.spec.epochs)
        if stopper.should_stop and progress.first_epoch < epochs:
            return True  # a resumed stage that had already stopped early
        for epoch in range(progress.first_epoch, epochs):
            caching_before = run.caching_s
            row = run.epoch(epoch, self.callbacks)
            # What the next epoch will cost: features cached during this one are not again.
            next_epoch_s = row["seconds"] - (run.caching_s - caching_before)
            self.backbone_as_built &= run.backbone_frozen
            self.setup.backbone_changed = not self.backbone_as_built
            if stopper.update(row[progress.monitor], row["epoch"]):
                self.best_state, self.best_run = run.remember_best(), run
                if self.ckpt_dir is not None and self.writes:
                    save_best_weights(self.ckpt_dir, weights_to_save(self.best_state,
                                                                     self.backbone_as_built))
            progress.history.append(row)
            progress.first_epoch = epoch + 1
            if self.ckpt_dir is not None and self.writes:
                self._save_checkpoint(run, index)
            if self.callbacks.on_epoch_end is not None:
                self.callbacks.on_epoch_end(row)
            # Taken once, by rank 0 (time differs between ranks), and followed by all.
            early, over, futile = ranks.agree((stopper.should_stop,
                                               not self.budget.fits(next_epoch_s),
                                               self._futile(run, epochs)))
            if epoch + 1 < epochs and early:
                log.info("early stopping after epoch %d (best epoch %s)", row["epoch"],
                         stopper.best_epoch)
                return True
            if epoch + 1 < epochs and futile is not None:
                # Recorded as the stage's epochs: a resumed run stops there too.
                self.choices.record("finetune.epochs", futile)
                self.choices.notify()
                log.info("fine-tuning stopped after epoch %d: %s", row["epoch"], futile.why)
                return True
            if epoch + 1 < epochs and over:
                self._out_of_time(row, next_epoch_s)
                return True
        return False

    def _futile(self, run: TrainingRun, epochs: int) -> rules.Choice | None:
        """Whether a fine-tuning stage is clearly not going to beat the stages before it on
        the monitored val metric (without a val split, stages are not compared)."""
        monitor, history = self.progress.monitor, self.progress.history
        if run.stage != "finetune" or monitor.startswith("train_"):
            return None
        before = [row[monitor] for row in history[:self.stage_offset]]
        stage = [row[monitor] for row in history[self.stage_offset:]]
        if not before or not all(math.isfinite(v) for v in before + stage):
            return None
        return rules.finetune_futile(stage, before, epochs, metric=monitor,
                                     higher_is_better=self.progress.stopper.mode == "max")

    def shared_features_of(self, samples: list, root: Path) -> torch.Tensor | None:
        """Those images' features from the shared store, when the best weights have the
        backbone as built and this run shares features (test images' computed now if no
        job has yet)."""
        run, decoded = self.best_run, self.setup.decoded
        if not samples or run is None or not run.backbone_frozen or decoded is None:
            return None
        rows = decoded.rows([s.path for s in samples], root)
        features = None if rows is None else self.setup.shared_features_of_rows(rows)
        return None if features is None else features.to(self.setup.precision.device)

    def best_val_features(self) -> torch.Tensor | None:
        """Cached val features, when the best weights have the backbone they came from."""
        run = self.best_run
        if run is None or not run.backbone_frozen or not run.has_cached("val"):
            return None
        return run.cached_features("val")[0]

    def _out_of_time(self, row: dict, next_epoch_s: float) -> None:
        self.out_of_time = True
        self.choices.record("time_budget_s", rules.budget_spent(
            self.choices.choice("time_budget_s"), row["epoch"], next_epoch_s))
        log.info("time budget spent after epoch %d", row["epoch"])

    def _finetune_plan(self, plan: StagePlan, resuming: bool) -> StagePlan | None:
        """The fine-tuning stage as it will run: as many epochs as the time budget holds;
        None: none at all (the head alone suffices, or not one epoch fits)."""
        if "finetune.augment" in self.choices:  # cut by the budget before a restart
            plan = with_augment(plan, self.choices.value("finetune.augment"))
        if "finetune.epochs" in self.choices:  # planned before a restart
            epochs = self.choices.value("finetune.epochs")
            return with_epochs(plan, epochs) if epochs > 0 else None
        if resuming:
            return plan
        if (enough := self._head_suffices(plan)) is not None:
            self.choices.record("finetune.epochs", enough)
            self.choices.notify()
            log.info("fine-tuning skipped: %s", enough.why)
            return None
        if self.budget.seconds is None:
            return plan
        planned = int(plan.spec.epochs)
        fit = self._epochs_that_fit(plan, planned)
        if (unaugmented := self._without_augmentation(plan, fit.value)) is not None:
            plan, fit = unaugmented, self._epochs_that_fit(unaugmented, planned)
        if fit.value < planned:
            self.choices.record("finetune.epochs", fit)
        self.choices.notify()
        return with_epochs(plan, fit.value) if fit.value else None

    def _epochs_that_fit(self, plan: StagePlan, planned: int) -> rules.Choice:
        return ranks.agree(rules.finetune_epochs_in_budget(planned, self._epoch_seconds(plan),
                                                           self.budget.left()))

    def _without_augmentation(self, plan: StagePlan, epochs: int) -> StagePlan | None:
        """The stage without the augmentation the recipe chose for its planned epochs, when
        the budget holds too few of them for it to pay (unaugmented epochs are re-timed:
        the frozen stages then run once per image, so more of them may fit)."""
        preset = PRESETS[plan.spec.preset]
        if "augment" not in self.choices or plan.spec.augment == "none" or \
                epochs >= preset.augment_from_epochs:
            return None  # augmentation asked for by the spec is kept whatever the budget
        self.choices.record("finetune.augment", rules.augment_cut(preset, epochs))
        log.info("augmentation dropped: the budget holds %d fine-tuning epoch(s)", epochs)
        return with_augment(plan, "none")

    def _head_suffices(self, plan: StagePlan) -> rules.Choice | None:
        """Whether the head stage's best model already gets every val image right."""
        monitor, before = self.progress.monitor, self.progress.history[:self.stage_offset]
        if monitor.startswith("train_") or not before:
            return None
        sign = -1.0 if self.progress.stopper.mode == "max" else 1.0
        best = min(before, key=lambda row: sign * row[monitor])
        return ranks.agree(rules.head_suffices(best["val_accuracy"],
                                               len(self.setup.val_source),
                                               PRESETS[plan.spec.preset]))

    def _epoch_seconds(self, plan: StagePlan) -> float:
        """One epoch of ``plan``, estimated by timing a few steps on a copy of the model."""
        probe = TrainingRun(self.setup, plan, model=copy.deepcopy(self.setup.model))
        device = self.setup.precision.device
        # The probe's augmentations and dropout must not move the run's random numbers: the
        # run then draws the same on any device count (its probe steps are a shard's).
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            step_s = probe.seconds_per_step(PROBE_STEPS)
        batch = plan.spec.batch_size
        val_steps = -(-len(self.setup.val_source) // batch)
        return probe.steps_per_epoch * step_s + val_steps * step_s / 3

    def _save_checkpoint(self, run: TrainingRun, index: int) -> None:
        assert self.ckpt_dir is not None
        progress = self.progress
        save_checkpoint(self.ckpt_dir, {
            "epoch": len(progress.history), "stage_epoch": progress.first_epoch,
            "stage_index": index, "stage_offset": self.stage_offset, "step": run.step,
            "n_trainable": run.n_trainable, "backbone_as_built": self.backbone_as_built,
            "model": weights_to_save(run.model.state_dict(), self.backbone_as_built),
            "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
            "early_stopping": progress.stopper.state_dict(), "history": progress.history,
            "spec": run.spec.model_dump(mode="json"), "resolved": self.choices.to_dict(),
            "classes": self.classes, "preprocessing": run.prep.to_dict(), "rng": rng_state(),
            "budget_spent_s": self.budget.spent(), "world_size": run.world, **self.extra,
        })
