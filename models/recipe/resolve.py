"""Turn a spec's "auto" fields into values, recording each choice and its reason.

``resolve_static`` makes the choices that need only the dataset's statistics; the API makes
them at submit, so the job view shows them at once, and the engine makes them again (with the
same result) when a spec reaches it without them. Choices that need the data or the model
(learning rates, epochs within the time budget) are made by the engine (``models.recipe.plan``
and ``models/training/``). Every rule is in ``models.recipe.rules``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from typing import Any

from ftune.models.backbones.catalog import PACKAGED_BACKBONES
from ftune.models.recipe import rules
from ftune.models.recipe.choices import Choices, Resolved
from ftune.models.recipe.presets import PRESETS
from ftune.models.recipe.stats import DatasetStats
from ftune.models.spec import FineTuneSpec

__all__ = ["STATIC_FIELDS", "Resolved", "apply_static", "backbone_size", "image_passes",
           "planned_epochs", "resolve_static", "two_stage"]

DEFAULT_BACKBONE_SIZE = 224


def backbone_size(backbone: str) -> int:
    entry = PACKAGED_BACKBONES.get(backbone)
    return entry.input_size if entry else DEFAULT_BACKBONE_SIZE


def two_stage(spec: FineTuneSpec) -> bool:
    """The auto freeze plan trains backbone stages after the head (presets but fast)."""
    return spec.freeze.strategy == "auto" and PRESETS[spec.preset].finetune


Rule = Callable[[FineTuneSpec, DatasetStats], rules.Choice | None]


@dataclass(frozen=True)
class StaticField:
    """A choice the dataset's statistics decide: when the spec asks for it, and its rule."""

    name: str  # the choice's name on jobs; with fills_spec, also the spec's (dotted) field
    rule: Rule  # returns None when there is no choice to make for this spec
    asked_by: str | None  # the spec field whose "auto" asks for it; None: always asked
    fills_spec: bool = True  # apply_static writes the value into the spec's field


def _stages_to_train(spec: FineTuneSpec, stats: DatasetStats) -> rules.Choice | None:
    preset = PRESETS[spec.preset]
    return rules.stages_to_train(stats.num_train, preset) if preset.finetune else None


def _epochs(spec: FineTuneSpec, stats: DatasetStats) -> rules.Choice:
    """The fine-tuning stage's epochs, or the head's when it trains alone."""
    preset = PRESETS[spec.preset]
    return (rules.head_epochs(preset) if spec.head_alone
            else rules.finetune_epochs(stats.num_train, preset,
                                       multi_label=stats.task == "multi_label"))


# In the order they are made (and shown). A new static choice is a rule in rules.py and a
# row here: apply_static then fills its spec field, and the worker keeps the API's choice.
STATIC_TABLE: tuple[StaticField, ...] = (
    StaticField("image_size", lambda spec, stats: rules.image_size(
        stats.median_short_side, backbone_size(spec.backbone), spec.preset), "image_size"),
    StaticField("class_weights", lambda _, stats: (
        rules.positive_weights(stats.class_counts, stats.num_train)
        if stats.task == "multi_label" else rules.class_weights(stats.imbalance_ratio)),
        "class_weights"),
    StaticField("optimizer.name", lambda *_: rules.optimizer_name(), "optimizer.name"),
    # The plan reads freeze.strategy "auto" to train in two stages: the spec keeps it.
    StaticField("freeze.strategy", lambda spec, _: rules.freeze_strategy(PRESETS[spec.preset]),
                "freeze.strategy", fills_spec=False),
    # Capped by the backbone's stage count once it is built (models.recipe.plan).
    StaticField("freeze.n_blocks", _stages_to_train, "freeze.strategy", fills_spec=False),
    StaticField("head.dropout", lambda spec, _: rules.head_dropout(head_alone=spec.head_alone),
                "head.dropout"),
    StaticField("epochs", _epochs, "epochs"),
    StaticField("unlabeled", lambda spec, stats: rules.unlabeled_advice(
        stats, spec.uses_unlabeled), None, fills_spec=False),
)
# Only these are passed from the API to the worker (what the worker measures, such as
# learning rates, is measured again on each attempt).
STATIC_FIELDS = tuple(field.name for field in STATIC_TABLE)


def _get(data: dict, dotted: str) -> Any:
    return reduce(lambda node, key: node[key], dotted.split("."), data)


def _set(data: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    reduce(lambda node, key: node[key], parents, data)[leaf] = value


def resolve_static(spec: FineTuneSpec, stats: DatasetStats) -> Resolved:
    """The choices for the spec's auto fields that the dataset's statistics decide."""
    asked = spec.model_dump(mode="json")
    choices = Choices()
    for field in STATIC_TABLE:
        if field.asked_by is not None and _get(asked, field.asked_by) != "auto":
            continue
        choice = field.rule(spec, stats)
        if choice is not None:
            choices.record(field.name, choice)
    return choices.to_dict()


def apply_static(spec: FineTuneSpec, resolved: Resolved) -> FineTuneSpec:
    """The spec with the statically resolved auto fields set (explicit fields are kept)."""
    data = spec.model_dump(mode="json")
    for field in STATIC_TABLE:
        if field.fills_spec and field.name in resolved and _get(data, field.name) == "auto":
            _set(data, field.name, resolved[field.name]["value"])
    if spec.epochs == "auto" and "epochs" in resolved:  # a warmup longer than the run shrinks
        data["schedule"]["warmup_epochs"] = min(data["schedule"]["warmup_epochs"],
                                                data["epochs"])
    return FineTuneSpec.model_validate(data)


def _planned(spec: FineTuneSpec, resolved: Resolved) -> int:
    return int(spec.epochs if spec.epochs != "auto" else resolved["epochs"]["value"])


def planned_epochs(spec: FineTuneSpec, resolved: Resolved) -> int:
    """Most epochs (metrics rows) the job may run: both stages when there are two."""
    if two_stage(spec):
        return _planned(spec, resolved) + PRESETS[spec.preset].head_max_epochs
    return _planned(spec, resolved)


def image_passes(spec: FineTuneSpec, resolved: Resolved) -> int:
    """Passes over the images the job may make, for the epoch-images quota: epochs on cached
    features reuse one pass."""
    cached_head = spec.freeze.strategy == "auto" and spec.augment in ("auto", "none")
    if two_stage(spec):
        return _planned(spec, resolved) + 1
    if cached_head and spec.epochs == "auto":
        return 1
    return _planned(spec, resolved)
