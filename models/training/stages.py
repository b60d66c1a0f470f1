"""Training in stages: the learning-rate range test, then each planned stage in turn (the
head on cached features, then fine-tuning), sharing one model, one early-stopping record and
one history, within the time budget, with a checkpoint after every epoch."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ftune.models.backbones import Backbone
from ftune.models.data.source import ImageSource
from ftune.models.data.transforms import normalize
from ftune.models.derived.decoded import DecodedImages
from ftune.models.derived.features import SharedFeatures, backbone_identity, shared_features
from ftune.models.derived.store import DerivedStore
from ftune.models.network import FineTuneModel, reinit_head
from ftune.models.preprocessing import Preprocessing
from ftune.models.recipe import rules
from ftune.models.recipe.plan import StagePlan, plan_stages, with_epochs, with_lr
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
from ftune.models.training.loop import stop_if_asked
from ftune.models.training.lr_finder import lr_range_test
from ftune.models.training.run import Callbacks, TrainingRun
from ftune.models.training.runtime import Precision, as_channels_last, feature_batch_size

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


@dataclass
class RunSetup:
    """What every stage shares: the backbone, the model being tuned and the decoded data."""

    backbone: Backbone
    model: FineTuneModel
    prep: Preprocessing
    precision: Precision
    train_source: ImageSource
    val_source: ImageSource
    class_weights: torch.Tensor | None
    should_stop: Callable[[], bool] | None = None  # also checked while features are cached
    decoded: DecodedImages | None = None  # the dataset's images, decoded once for all jobs
    derived: DerivedStore | None = None  # where features shared with other jobs are kept
    owner: str | None = None  # whose store entries this run makes
    # Set once an epoch has trained backbone weights: features are no longer the shared ones.
    backbone_changed: bool = False
    on_choice: Callable[[str, dict], None] | None = None  # a choice made while training
    # Set when pretraining adapted the backbone: its features are shared under this key.
    adapted_key: str | None = None
    # The decoded rows of the images trained and validated on (test images come after them).
    fit_rows: range = range(0)
    _shared: SharedFeatures | None = None
    _shared_rest: SharedFeatures | None = None  # the test images' features, when asked for

    def connect(self, callbacks: Callbacks, choices: dict) -> None:
        """Stop when the caller asks; report choices made while training as they are made."""
        self.should_stop = callbacks.should_stop

        def on_choice(name: str, choice: dict) -> None:
            choices[name] = choice
            if callbacks.on_resolved is not None:
                callbacks.on_resolved(dict(choices))

        self.on_choice = on_choice

    def run(self, plan: StagePlan, *, cache_features: bool, epoch_offset: int = 0,
            model: FineTuneModel | None = None) -> TrainingRun:
        run = TrainingRun(model or self.model, plan.spec, self.backbone.stages, self.prep,
                          self.precision, self.train_source, self.val_source, cache_features,
                          stage=plan.name, epoch_offset=epoch_offset,
                          class_weights=self.class_weights)
        run.should_stop = self.should_stop
        run.shared_features = self.shared_features
        return run

    def shared_features(self) -> SharedFeatures | None:
        """The frozen backbone's features of the images trained and validated on, shared
        with other jobs on the same images, backbone and precision (computed into the store
        by the first)."""
        if self._shared is not None or self.backbone_changed:
            return None if self.backbone_changed else self._shared
        self._shared, made = self._open(self.fit_rows)
        if self._shared is not None and self.on_choice is not None:
            self.on_choice("feature_cache", {
                "value": "computed" if made else "reused",
                "why": ("frozen features of the training images computed once, kept for "
                        "later jobs with the same images, size, backbone and precision")
                if made else
                ("frozen features reused from an earlier job with the same images, size, "
                 "backbone and precision")})
        return self._shared

    def shared_features_of_rows(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Features of decoded ``rows`` from the store, for a model whose backbone is as
        built (its best weights): the test images' entry is computed on first use. None
        when this run does not share features or the rows span both entries."""
        shared, decoded = self._shared, self.decoded
        if shared is None or decoded is None or not len(rows):
            return None
        if shared.covers(rows):
            return shared.take(rows)
        if self._shared_rest is None and self.fit_rows.stop < len(decoded.array):
            self._shared_rest, _ = self._open(range(self.fit_rows.stop, len(decoded.array)))
        rest = self._shared_rest
        return rest.take(rows) if rest is not None and rest.covers(rows) else None

    def _open(self, rows: range) -> tuple[SharedFeatures | None, bool]:
        """The store's entry for ``rows`` of the backbone as it is now, computed if absent
        (True when computed now); None when this run shares no features."""
        identity = backbone_identity(self.backbone.name, self.backbone.weights_source)
        if self.adapted_key is not None:  # "unshared": adapted where nothing can be shared
            identity = (None if self.adapted_key == "unshared"
                        else f"{identity or self.backbone.name}|adapted:{self.adapted_key}")
        if self.derived is None or self.decoded is None or identity is None or not len(rows):
            return None, False
        backbone, device, prep = self.model.backbone, self.precision.device, self.prep
        backbone.eval()

        @torch.no_grad()
        def extract(images: torch.Tensor) -> torch.Tensor:
            batch = as_channels_last(normalize(images.to(device).float(), prep))
            with self.precision.autocast():
                return backbone(batch)

        return shared_features(
            self.derived, self.decoded, rows, backbone=identity,
            precision=self.precision.name, extract=extract,
            batch_size=feature_batch_size(device),
            should_stop=lambda: stop_if_asked(self.should_stop), owner=self.owner)


def plan_with_lr(setup: RunSetup, spec: FineTuneSpec, choices: dict, cache_features: bool,
                 resumed: bool) -> tuple[list[StagePlan], list[dict], TrainingRun | None]:
    """The stages with their learning rates: from the range test when the lr is auto (or
    from ``choices`` when resuming). Returns the plans, the test's curve, and the run whose
    feature cache the first stage can reuse."""
    plans = plan_stages(spec, choices, len(setup.backbone.stages))
    if spec.optimizer.lr != "auto":
        return plans, [], None
    if resumed:
        return _rates(plans, choices, choices["optimizer.lr"]["value"]), [], None
    probe = setup.run(with_lr(plans[0], 1e-3), cache_features=cache_features)
    features, labels = probe.cached_features("train")
    test = lr_range_test(setup.model.head, features, labels, loss_fn=probe.loss_fn,
                         batch_size=spec.batch_size, seed=spec.seed)
    head = rules.head_lr(test.suggested_lr, test.why())
    choices["optimizer.lr"] = head.to_dict()
    return _rates(plans, choices, head.value), test.curve, probe


def _rates(plans: list[StagePlan], choices: dict, head_lr: float) -> list[StagePlan]:
    rated = []
    for plan in plans:
        if not plan.trains_backbone:
            rated.append(with_lr(plan, head_lr))
            continue
        choice = rules.finetune_lr(head_lr)
        choices["finetune.lr" if plan.name == "finetune" else "optimizer.lr"] = {
            "value": choice.value, "why": choice.why}
        rated.append(with_lr(plan, choice.value))
    return rated


class StageRunner:
    def __init__(self, setup: RunSetup, plans: list[StagePlan], progress: Progress,
                 callbacks: Callbacks, choices: dict, budget: Budget, ckpt_dir: Path | None,
                 cache_features: bool, classes: list[str]) -> None:
        self.setup, self.plans, self.progress = setup, plans, progress
        self.classes = classes
        self.callbacks, self.choices, self.budget = callbacks, choices, budget
        self.ckpt_dir, self.cache_features = ckpt_dir, cache_features
        self.best_state: dict | None = None
        self.best_run: TrainingRun | None = None  # the run whose epoch was the best so far
        self.stage_offset = 0  # history rows before the current stage
        self.out_of_time = False
        # No epoch has changed the backbone yet: checkpoints need only the head's weights.
        self.backbone_as_built = True

    def run_all(self, features_from: TrainingRun | None, state: dict | None
                ) -> tuple[TrainingRun, bool]:
        """Train every stage; returns the last stage's run and whether it stopped early."""
        first = state.get("stage_index", 0) if state else 0
        run, stopped_early = None, False
        for index, plan in enumerate(self.plans):
            if index < first:
                continue
            resuming = state is not None and index == first
            if plan.name == "finetune":
                plan = self._fit_to_budget(plan, resuming)
                if plan is None:
                    break
            if resuming:
                self.stage_offset = state.get("stage_offset", 0)
            elif plan.fresh_head:
                reinit_head(self.setup.model.head, plan.spec.head, plan.spec.seed)
            run = self.setup.run(plan, cache_features=self.cache_features,
                                 epoch_offset=self.stage_offset)
            if features_from is not None and run.backbone_frozen:
                run.adopt_features(features_from)
            self._begin(run, index, state if resuming else None)
            stopped_early = self._train_epochs(run, index)
            features_from, self.stage_offset = run, len(self.progress.history)
            if self.out_of_time:
                break
            if self.best_state is not None:  # the next stage starts from the best so far
                self.setup.model.load_state_dict(self.best_state)
        assert run is not None, "a plan has at least one stage"
        return run, stopped_early

    def _begin(self, run: TrainingRun, index: int, state: dict | None) -> None:
        progress, spec = self.progress, run.spec
        if state is not None and "model" in state:
            self._resume(run, state)
        else:
            progress.first_epoch, progress.stage_index = 0, index
            progress.stopper.patience = spec.early_stopping.patience
            progress.stopper.bad_epochs = 0
            if index > 0 and progress.monitor.startswith("train_"):
                # Without a val split the training loss is watched, and a stage that trains
                # more layers on augmented images starts higher: judge it on its own.
                progress.stopper.restart()
        if self.callbacks.on_stage is not None:
            self.callbacks.on_stage(run.stage, self.stage_offset + spec.epochs)

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
        progress.stopper.patience = run.spec.early_stopping.patience
        restore_rng_state(state["rng"])
        log.info("resumed at epoch %d of stage %s", len(progress.history), run.stage)

    def _train_epochs(self, run: TrainingRun, index: int) -> bool:
        """The stage's remaining epochs; True when early stopping or the budget ended it."""
        progress, stopper, epochs = self.progress, self.progress.stopper, run.spec.epochs
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
                if self.ckpt_dir is not None:
                    save_best_weights(self.ckpt_dir, weights_to_save(self.best_state,
                                                                     self.backbone_as_built))
            progress.history.append(row)
            progress.first_epoch = epoch + 1
            if self.ckpt_dir is not None:
                self._save_checkpoint(run, index)
            if self.callbacks.on_epoch_end is not None:
                self.callbacks.on_epoch_end(row)
            if epoch + 1 < epochs and stopper.should_stop:
                log.info("early stopping after epoch %d (best epoch %s)", row["epoch"],
                         stopper.best_epoch)
                return True
            if epoch + 1 < epochs and not self.budget.fits(next_epoch_s):
                self._out_of_time(row, next_epoch_s)
                return True
        return False

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
        self.choices["time_budget_s"]["why"] += (
            f"; it ended training after epoch {row['epoch']}, since another epoch "
            f"(~{next_epoch_s:.0f} s) would not fit")
        log.info("time budget spent after epoch %d", row["epoch"])

    def _fit_to_budget(self, plan: StagePlan, resuming: bool) -> StagePlan | None:
        """The fine-tuning stage with as many epochs as the budget holds (None: not one)."""
        if "finetune.epochs" in self.choices:  # planned before a restart
            epochs = self.choices["finetune.epochs"]["value"]
            return with_epochs(plan, epochs) if epochs > 0 else None
        if self.budget.seconds is None or resuming:
            return plan
        seconds = self._epoch_seconds(plan)
        fit = max(0, int(self.budget.left() // seconds))  # the budget may be spent already
        epochs = min(plan.spec.epochs, fit)
        why = (f"{seconds:.1f} s per epoch (timed on the first batches), "
               f"{max(0.0, self.budget.left()):.0f} s of the time budget left")
        if epochs < plan.spec.epochs:
            self.choices["finetune.epochs"] = {"value": epochs, "why": why + (
                f": {epochs} of the {plan.spec.epochs} planned fit" if epochs else
                ": no fine-tuning epoch fits, the head alone is kept")}
        if self.callbacks.on_resolved is not None:
            self.callbacks.on_resolved(dict(self.choices))
        return with_epochs(plan, epochs) if epochs else None

    def _epoch_seconds(self, plan: StagePlan) -> float:
        """One epoch of ``plan``, estimated by timing a few steps on a copy of the model."""
        probe = self.setup.run(plan, cache_features=self.cache_features,
                               model=copy.deepcopy(self.setup.model))
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
            "spec": run.spec.model_dump(mode="json"), "resolved": self.choices,
            "classes": self.classes, "preprocessing": run.prep.to_dict(), "rng": rng_state(),
            "budget_spent_s": self.budget.spent(),
        })
