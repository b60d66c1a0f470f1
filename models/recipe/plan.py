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
from ftune.models.recipe.presets import PRESETS, Preset
from ftune.models.recipe.resolve import Resolved, two_stage
from ftune.models.spec import FineTuneSpec

# Warmup for the fine-tuning stage: half an epoch ramps the new rates in gently.
FINETUNE_WARMUP_EPOCHS = 0.5
DEFAULT_PATIENCE = 3  # an explicit freeze strategy with patience auto


@dataclass(frozen=True)
class StagePlan:
    name: str  # "head" | "finetune" | "train"
    spec: FineTuneSpec
    fresh_head: bool = False  # starts from a new head, not the one the stage before trained

    @property
    def trains_backbone(self) -> bool:
        return self.spec.freeze.strategy != "head_only"


def _with(spec: FineTuneSpec, **changes: object) -> FineTuneSpec:
    """A copy with dotted fields replaced ("optimizer.lr": 0.01), validated again."""
    data = spec.model_dump(mode="json")
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = data
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return FineTuneSpec.model_validate(data)


def _patience(spec: FineTuneSpec, preset_patience: int) -> int:
    if spec.early_stopping.patience != "auto":
        return spec.early_stopping.patience
    return preset_patience if spec.freeze.strategy == "auto" else DEFAULT_PATIENCE


def _head_stage(spec: FineTuneSpec, preset: Preset, epochs: int) -> StagePlan:
    patience = _patience(spec, preset.head_patience)
    return StagePlan("head", _with(
        spec, freeze__strategy="head_only", epochs=epochs, augment="none",
        schedule__name="constant", schedule__warmup_epochs=0, optimizer__layer_decay=None,
        early_stopping__patience=patience))


def _training_stage(name: str, spec: FineTuneSpec, preset: Preset, *, strategy: str,
                    n_blocks: int, resolved: Resolved) -> StagePlan:
    epochs = int(spec.epochs)
    changes: dict[str, object] = {"freeze__strategy": strategy, "freeze__n_blocks": n_blocks}
    if spec.augment == "auto":
        choice = rules.augment(preset, backbone_trains=True, epochs=epochs)
        changes["augment"] = choice.value
        resolved["augment"] = choice.to_dict()
    if spec.schedule.name == "auto":
        warmup = spec.schedule.warmup_epochs or min(FINETUNE_WARMUP_EPOCHS, epochs / 2)
        changes |= {"schedule__name": "cosine", "schedule__warmup_epochs": warmup}
        resolved["schedule.name"] = {"value": "cosine", "why": f"{warmup:g} epoch(s) of "
                                     "linear warmup, then cosine decay to zero"}
    if spec.optimizer.layer_decay == "auto":
        choice = rules.layer_decay()
        changes["optimizer__layer_decay"] = choice.value
        resolved["optimizer.layer_decay"] = choice.to_dict()
    patience = _patience(spec, preset.finetune_patience)
    if name == "finetune" and spec.early_stopping.patience == "auto":
        # Its cosine schedule's last epochs, at the lowest rates, are usually its best, and
        # its first ones are often below the head's best: it runs to the end of its plan.
        patience = max(patience, epochs)
    changes["early_stopping__patience"] = patience
    return StagePlan(name, _with(spec, epochs=epochs, **changes))


def plan_stages(spec: FineTuneSpec, resolved: Resolved, num_stages: int) -> list[StagePlan]:
    """The stages to train, in order; adds the choices it makes to ``resolved``."""
    preset = PRESETS[spec.preset]
    if spec.freeze.strategy == "auto" and not two_stage(spec):
        return [_head_stage(spec, preset, int(spec.epochs))]
    if spec.freeze.strategy == "auto":
        n_blocks = min(int(resolved["freeze.n_blocks"]["value"]), num_stages)
        resolved["freeze.n_blocks"]["value"] = n_blocks
        finetune = _training_stage("finetune", spec, preset, strategy="last_n_blocks",
                                   n_blocks=n_blocks, resolved=resolved)
        resolved["finetune.head"] = rules.finetune_head().to_dict()
        return [_head_stage(spec, preset, preset.head_max_epochs),
                StagePlan(finetune.name, finetune.spec, fresh_head=True)]
    if spec.freeze.strategy == "head_only":
        plan = _head_stage(spec, preset, int(spec.epochs))
        if spec.augment not in ("auto", "none"):  # augmentation asked for: no feature cache
            plan = StagePlan("head", _with(plan.spec, augment=spec.augment))
        if spec.schedule.name != "auto":
            plan = StagePlan("head", _with(plan.spec, schedule__name=spec.schedule.name,
                                           schedule__warmup_epochs=spec.schedule.warmup_epochs))
        return [StagePlan("train", plan.spec)]
    return [_training_stage("train", spec, preset, strategy=spec.freeze.strategy,
                            n_blocks=spec.freeze.n_blocks, resolved=resolved)]


def with_lr(plan: StagePlan, lr: float) -> StagePlan:
    return replace(plan, spec=_with(plan.spec, optimizer__lr=lr))


def with_epochs(plan: StagePlan, epochs: int) -> StagePlan:
    warmup = min(plan.spec.schedule.warmup_epochs, epochs)
    return replace(plan, spec=_with(plan.spec, epochs=epochs, schedule__warmup_epochs=warmup))
