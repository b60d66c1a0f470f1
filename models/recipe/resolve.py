"""Turn a spec's "auto" fields into values, recording each choice and its reason.

``resolve_static`` makes the choices that need only the dataset's statistics; the API makes
them at submit, so the job view shows them at once, and the engine makes them again (with the
same result) when a spec reaches it without them. Choices that need the data or the model
(learning rates, epochs within the time budget) are made in ``models.recipe.plan``.
"""

from __future__ import annotations

from ftune.models.backbones.catalog import PACKAGED_BACKBONES
from ftune.models.recipe import rules
from ftune.models.recipe.presets import PRESETS
from ftune.models.recipe.stats import DatasetStats
from ftune.models.spec import FineTuneSpec

DEFAULT_BACKBONE_SIZE = 224
# The choices resolve_static makes: only these are passed from the API to the worker (what
# the worker measures, such as learning rates, is measured again on each attempt).
STATIC_FIELDS = ("image_size", "class_weights", "optimizer.name", "epochs", "freeze.strategy",
                 "freeze.n_blocks", "head.dropout", "unlabeled")

Resolved = dict[str, dict]  # field -> {"value": ..., "why": "..."}


def backbone_size(backbone: str) -> int:
    entry = PACKAGED_BACKBONES.get(backbone)
    return entry.input_size if entry else DEFAULT_BACKBONE_SIZE


def two_stage(spec: FineTuneSpec) -> bool:
    """The auto freeze plan trains backbone stages after the head (presets but fast)."""
    return spec.freeze.strategy == "auto" and PRESETS[spec.preset].finetune


def resolve_static(spec: FineTuneSpec, stats: DatasetStats) -> Resolved:
    """The choices for the spec's auto fields that the dataset's statistics decide."""
    preset = PRESETS[spec.preset]
    choices: dict[str, rules.Choice] = {}
    if spec.image_size == "auto":
        choices["image_size"] = rules.image_size(stats.median_short_side,
                                                 backbone_size(spec.backbone), spec.preset)
    if spec.class_weights == "auto":
        choices["class_weights"] = rules.class_weights(stats.imbalance_ratio)
    if spec.optimizer.name == "auto":
        choices["optimizer.name"] = rules.optimizer_name()
    if spec.freeze.strategy == "auto":
        choices["freeze.strategy"] = (
            rules.Choice("two_stage", "the head alone on cached features until validation "
                         "stops improving, then the top stages with it")
            if preset.finetune else
            rules.Choice("head_only", f"preset {preset.name}: the head alone, on cached "
                         "features"))
        if preset.finetune:
            choices["freeze.n_blocks"] = rules.stages_to_train(stats.num_train, preset)
    trains_backbone = not spec.head_alone
    if spec.head.dropout == "auto":
        choices["head.dropout"] = rules.head_dropout(head_alone=not trains_backbone)
    if spec.epochs == "auto":
        choices["epochs"] = (rules.finetune_epochs(stats.num_train, preset) if trains_backbone
                             else rules.head_epochs(preset))
    advice = rules.unlabeled_advice(stats, spec.uses_unlabeled)
    if advice is not None:
        choices["unlabeled"] = advice
    return {name: choice.to_dict() for name, choice in choices.items()}


def apply_static(spec: FineTuneSpec, resolved: Resolved) -> FineTuneSpec:
    """The spec with the statically resolved auto fields set (explicit fields are kept)."""
    data = spec.model_dump(mode="json")
    for name in ("image_size", "class_weights", "epochs"):
        if data[name] == "auto" and name in resolved:
            data[name] = resolved[name]["value"]
    if spec.epochs == "auto" and "epochs" in resolved:  # a warmup longer than the run shrinks
        data["schedule"]["warmup_epochs"] = min(data["schedule"]["warmup_epochs"],
                                                data["epochs"])
    if data["head"]["dropout"] == "auto" and "head.dropout" in resolved:
        data["head"]["dropout"] = resolved["head.dropout"]["value"]
    if data["optimizer"]["name"] == "auto" and "optimizer.name" in resolved:
        data["optimizer"]["name"] = resolved["optimizer.name"]["value"]
    return FineTuneSpec.model_validate(data)


def _epochs(spec: FineTuneSpec, resolved: Resolved) -> int:
    return int(spec.epochs if spec.epochs != "auto" else resolved["epochs"]["value"])


def planned_epochs(spec: FineTuneSpec, resolved: Resolved) -> int:
    """Most epochs (metrics rows) the job may run: both stages when there are two."""
    if two_stage(spec):
        return _epochs(spec, resolved) + PRESETS[spec.preset].head_max_epochs
    return _epochs(spec, resolved)


def image_passes(spec: FineTuneSpec, resolved: Resolved) -> int:
    """Passes over the images the job may make, for the epoch-images quota: epochs on cached
    features reuse one pass."""
    cached_head = spec.freeze.strategy == "auto" and spec.augment in ("auto", "none")
    if two_stage(spec):
        return _epochs(spec, resolved) + 1
    if cached_head and spec.epochs == "auto":
        return 1
    return _epochs(spec, resolved)
