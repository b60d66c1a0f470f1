"""The stages a spec trains in, each a concrete spec with no "auto" left but the learning rate
(which the range test sets, once the features are cached).

``freeze.strategy: auto`` trains in two stages: ``head`` (the backbone frozen, features cached,
until validation stops improving) and ``finetune`` (the top stages join, with discriminative
rates, warmup and cosine decay, and augmentation). Preset ``fast`` stops after the head. An
explicit strategy is one stage, ``train``, whose remaining auto fields follow the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ftune.models.recipe import rules
from ftune.models.recipe.choices import Choices
from ftune.models.recipe.presets import PRESETS, Preset
from ftune.models.recipe.resolve import two_stage
from ftune.models.spec import FineTuneSpec


@dataclass(frozen=True)
class StagePlan:
    name: str  # "head" | "finetune" | "train"
    spec: FineTuneSpec
    fresh_head: bool = False  # starts from a new head, not the one the stage before trained

    @property
    def trains_backbone(self) -> bool:
        return self.spec.freeze.strategy != "head_only"


def _with(spec: FineTuneSpec, **changes: object) -> FineTuneSpec:
    """A copy with nested fields replaced (``optimizer__lr=0.01``), validated again."""
    data = spec.model_dump(mode="json")
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = data
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return FineTuneSpec.model_validate(data)


def _patience(spec: FineTuneSpec, stage: str, preset: Preset, epochs: int) -> int:
    if spec.early_stopping.patience != "auto":
        return spec.early_stopping.patience
    return int(rules.patience(stage, preset, epochs).value)


def _head_stage(spec: FineTuneSpec, preset: Preset, epochs: int,
                name: str = "head") -> StagePlan:
    patience = _patience(spec, name, preset, epochs)
    return StagePlan(name, _with(
        spec, freeze__strategy="head_only", epochs=epochs, augment="none",
        schedule__name="constant", schedule__warmup_epochs=0, optimizer__layer_decay=None,
        early_stopping__patience=patience))


def _training_stage(name: str, spec: FineTuneSpec, preset: Preset, *, strategy: str,
                    n_blocks: int, choices: Choices) -> StagePlan:
    epochs = int(spec.epochs)
    changes: dict[str, object] = {"freeze__strategy": strategy, "freeze__n_blocks": n_blocks}
    if spec.augment == "auto":
        changes["augment"] = choices.record(
            "augment", rules.augment(preset, backbone_trains=True, epochs=epochs))
    if spec.schedule.name == "auto":
        warmup = rules.warmup_epochs(spec.schedule.warmup_epochs, epochs)
        changes |= {"schedule__name": choices.record("schedule.name", rules.schedule(warmup)),
                    "schedule__warmup_epochs": warmup}
    if spec.optimizer.layer_decay == "auto":
        changes["optimizer__layer_decay"] = choices.record("optimizer.layer_decay",
                                                           rules.layer_decay())
    changes["early_stopping__patience"] = _patience(spec, name, preset, epochs)
    return StagePlan(name, _with(spec, epochs=epochs, **changes))


def plan_stages(spec: FineTuneSpec, choices: Choices, num_stages: int) -> list[StagePlan]:
    """The stages to train, in order; records the choices it makes in ``choices``."""
    preset = PRESETS[spec.preset]
    if spec.freeze.strategy == "auto" and not two_stage(spec):
        return [_head_stage(spec, preset, int(spec.epochs))]
    if spec.freeze.strategy == "auto":
        n_blocks = choices.record("freeze.n_blocks", rules.stages_within(
            choices.choice("freeze.n_blocks"), num_stages))
        finetune = _training_stage("finetune", spec, preset, strategy="last_n_blocks",
                                   n_blocks=n_blocks, choices=choices)
        choices.record("finetune.head", rules.finetune_head())
        return [_head_stage(spec, preset, preset.head_max_epochs),
                StagePlan(finetune.name, finetune.spec, fresh_head=True)]
    if spec.freeze.strategy == "head_only":
        plan = _head_stage(spec, preset, int(spec.epochs), name="train")
        if spec.augment not in ("auto", "none"):  # augmentation asked for: no feature cache
            plan = replace(plan, spec=_with(plan.spec, augment=spec.augment))
        if spec.schedule.name != "auto":
            plan = replace(plan, spec=_with(
                plan.spec, schedule__name=spec.schedule.name,
                schedule__warmup_epochs=spec.schedule.warmup_epochs))
        return [plan]
    return [_training_stage("train", spec, preset, strategy=spec.freeze.strategy,
                            n_blocks=spec.freeze.n_blocks, choices=choices)]


def with_lr(plan: StagePlan, lr: float) -> StagePlan:
    return replace(plan, spec=_with(plan.spec, optimizer__lr=lr))


def with_epochs(plan: StagePlan, epochs: int) -> StagePlan:
    warmup = min(plan.spec.schedule.warmup_epochs, epochs)
    return replace(plan, spec=_with(plan.spec, epochs=epochs, schedule__warmup_epochs=warmup))


def with_augment(plan: StagePlan, augment: str) -> StagePlan:
    return replace(plan, spec=_with(plan.spec, augment=augment))
