"""Each auto rule on its own, and resolve_static as a whole: same statistics, same choices."""

from __future__ import annotations

import math

import pytest

from ftune.models.recipe import rules
from ftune.models.recipe.choices import Choices
from ftune.models.recipe.plan import plan_stages
from ftune.models.recipe.presets import PRESETS
from ftune.models.recipe.resolve import (
    apply_static,
    image_passes,
    planned_epochs,
    resolve_static,
)
from ftune.models.recipe.stats import DatasetStats, size_summary, stats_from_report
from ftune.models.spec import FineTuneSpec, parse_spec

BALANCED = PRESETS["balanced"]


@pytest.mark.parametrize(("short_side", "expected"), [
    (8, 96), (28, 96), (40, 128), (50, 160), (75, 224), (500, 224), (3000, 224), (None, 224)])
def test_image_size_upscales_small_images_at_most_3x_and_keeps_photos_at_backbone_size(
        short_side, expected):
    choice = rules.image_size(short_side, 224)
    assert choice.value == expected
    assert (str(short_side) in choice.why) if short_side else "unknown" in choice.why


def test_image_size_never_exceeds_the_backbone_size():
    assert rules.image_size(100, 160).value == 160


@pytest.mark.parametrize(("short_side", "expected"), [(8, 128), (28, 128), (40, 160), (75, 224)])
def test_preset_best_upscales_at_most_4x(short_side, expected):
    assert rules.image_size(short_side, 224, "best").value == expected


@pytest.mark.parametrize(("ratio", "expected"), [
    (None, "none"), (1.0, "none"), (2.9, "none"), (3.0, "balanced"), (10.0, "balanced")])
def test_class_weights_are_balanced_from_3_to_1(ratio, expected):
    assert rules.class_weights(ratio).value == expected


def test_optimizer_is_adam():
    assert rules.optimizer_name().value == "adam"


@pytest.mark.parametrize(("images", "preset", "expected"), [
    (200, "balanced", 1), (2700, "balanced", 3), (20_000, "balanced", 3),
    (2700, "best", 4), (2700, "fast", 0)])
def test_small_data_trains_fewer_stages(images, preset, expected):
    assert rules.stages_to_train(images, PRESETS[preset]).value == expected


def test_stages_are_capped_by_the_backbone():
    assert rules.stages_to_train(50_000, PRESETS["best"], num_stages=2).value == 2


@pytest.mark.parametrize(("images", "expected"), [(100, 12), (200, 10), (2700, 3),
                                                   (100_000, 2)])
def test_finetune_epochs_fall_with_dataset_size(images, expected):
    assert rules.finetune_epochs(images, BALANCED).value == expected


def test_a_multi_label_set_fine_tunes_twice_as_long_within_the_same_bounds():
    single = resolve_static(FineTuneSpec(), DatasetStats({"a": 900, "b": 700}, 56,
                                                         images=2400))
    multi = resolve_static(FineTuneSpec(), DatasetStats({"a": 900, "b": 700}, 56,
                                                        images=2400, task="multi_label"))
    assert (single["epochs"]["value"], multi["epochs"]["value"]) == (3, 6)
    assert "multi-label" in multi["epochs"]["why"]
    assert "multi-label" not in single["epochs"]["why"]
    assert rules.finetune_epochs(100, BALANCED, multi_label=True).value == 12  # the cap


def test_best_preset_trains_longer():
    assert rules.finetune_epochs(2700, PRESETS["best"]).value > \
        rules.finetune_epochs(2700, BALANCED).value


def test_time_budget_comes_from_spec_else_preset_and_is_capped_by_the_run_time_limit():
    assert rules.time_budget(BALANCED, None, None).value == BALANCED.budget_s
    assert rules.time_budget(BALANCED, 60, None).value == 60
    capped = rules.time_budget(BALANCED, None, 1000)
    assert capped.value == 800 and "run-time limit" in capped.why


def test_head_lr_is_kept_in_range_and_finetune_lr_is_a_third_at_most_1e_3():
    assert rules.head_lr(5.0, "test").value == rules.HEAD_LR[1]
    assert rules.head_lr(1e-7, "test").value == rules.HEAD_LR[0]
    assert rules.head_lr(3e-3, "test").value == 3e-3
    assert rules.finetune_lr(3e-3).value == 1e-3
    assert math.isclose(rules.finetune_lr(5e-4).value, 5e-4)


def test_size_summary_reads_the_median_short_side():
    summary = size_summary([(28, 28), (640, 480), (30, 40), (1000, 20)])
    assert summary["median_short_side"] == 28
    assert summary["min_short_side"] == 20 and summary["max_short_side"] == 480
    assert size_summary([]) is None


def _stats(counts: dict[str, int], side: int | None = 28) -> DatasetStats:
    return DatasetStats(counts, side)


def test_empty_spec_resolves_every_static_field_with_a_reason():
    resolved = resolve_static(FineTuneSpec(), _stats({"a": 100, "b": 120}))
    assert set(resolved) == {"image_size", "class_weights", "optimizer.name", "epochs",
                             "freeze.strategy", "freeze.n_blocks", "head.dropout"}
    assert all(choice["why"] for choice in resolved.values())
    assert resolved["freeze.strategy"]["value"] == "two_stage"
    spec = apply_static(FineTuneSpec(), resolved)
    assert spec.image_size == 96 and spec.optimizer.name == "adam"
    assert spec.class_weights == "none" and spec.freeze.strategy == "auto"


def test_explicit_values_win():
    spec = parse_spec({"image_size": 64, "optimizer": {"name": "sgd", "lr": 0.01},
                       "freeze": {"strategy": "head_only"}, "epochs": 4,
                       "class_weights": "none", "head": {"dropout": 0.1}})
    resolved = resolve_static(spec, _stats({"a": 100, "b": 10}))
    assert resolved == {}
    assert apply_static(spec, resolved) == spec
    (plan,) = plan_stages(spec, Choices(resolved), num_stages=7)
    assert plan.spec.freeze.strategy == "head_only" and plan.spec.epochs == 4
    assert plan.spec.optimizer.lr == 0.01 and plan.spec.optimizer.name == "sgd"


def test_the_same_statistics_give_the_same_choices():
    stats = _stats({"a": 300, "b": 30}, side=50)
    assert resolve_static(FineTuneSpec(), stats) == resolve_static(FineTuneSpec(), stats)


def test_two_stage_plan_has_a_cached_head_stage_then_a_finetune_stage():
    spec = FineTuneSpec()
    resolved = resolve_static(spec, _stats({"a": 1000, "b": 1000}))
    choices = Choices(resolved)
    head, finetune = plan_stages(apply_static(spec, resolved), choices, num_stages=9)
    assert head.spec.freeze.strategy == "head_only" and head.spec.augment == "none"
    assert finetune.spec.freeze.strategy == "last_n_blocks"
    # Three passes over 2,000 images: no augmentation (the frozen stages then run once).
    assert finetune.spec.freeze.n_blocks == 3 and finetune.spec.augment == "none"
    # The fine-tuning stage runs its cosine schedule to the end (its last epochs are best).
    assert finetune.spec.early_stopping.patience >= int(apply_static(spec, resolved).epochs)
    assert finetune.spec.schedule.name == "cosine" and finetune.spec.schedule.warmup_epochs > 0
    assert finetune.spec.optimizer.layer_decay == rules.LAYER_DECAY
    assert finetune.spec.freeze.batchnorm == "frozen"
    # It starts from a new head, and says so.
    assert finetune.fresh_head and not head.fresh_head
    assert choices.value("finetune.head") == "new"


def test_augmentation_only_when_fine_tuning_sees_the_images_many_times():
    balanced = PRESETS["balanced"]
    few = rules.finetune_epochs(2000, balanced).value
    many = rules.finetune_epochs(300, balanced).value
    assert few < balanced.augment_from_epochs <= many
    assert rules.augment(balanced, True, few).value == "none"
    assert rules.augment(balanced, True, many).value == "crop"
    assert rules.augment(PRESETS["best"], True, few).value == "strong"  # best always does
    assert rules.augment(PRESETS["balanced"], False, many).value == "none"
    spec = FineTuneSpec()
    resolved = resolve_static(spec, _stats({"a": 150, "b": 150}))
    choices = Choices(resolved)
    _, finetune = plan_stages(apply_static(spec, resolved), choices, num_stages=9)
    assert finetune.spec.augment == "crop" and choices.value("augment") == "crop"


def test_fast_preset_is_head_only_on_cached_features():
    spec = FineTuneSpec(preset="fast")
    resolved = resolve_static(spec, _stats({"a": 1000, "b": 1000}))
    (head,) = plan_stages(apply_static(spec, resolved), Choices(resolved), num_stages=9)
    assert head.spec.freeze.strategy == "head_only" and head.spec.augment == "none"
    assert image_passes(spec, resolved) == 1
    assert planned_epochs(spec, resolved) == PRESETS["fast"].head_max_epochs


def test_quota_counts_image_passes_not_cached_head_epochs():
    spec = FineTuneSpec()
    resolved = resolve_static(spec, _stats({"a": 1350, "b": 1350}))
    finetune = resolved["epochs"]["value"]
    assert image_passes(spec, resolved) == finetune + 1
    assert planned_epochs(spec, resolved) == finetune + BALANCED.head_max_epochs


def test_stats_from_an_old_report_have_no_sizes():
    stats = stats_from_report({"ok": True}, {"a": 3, "b": 9})
    assert stats.median_short_side is None and stats.imbalance_ratio == 3.0
    assert resolve_static(FineTuneSpec(), stats)["image_size"]["value"] == 224


def test_the_range_test_suggests_where_the_loss_falls_fastest():
    from ftune.models.training.lr_finder import steepest

    # Flat, then falling fastest around 1e-3, bottoming out at 3e-2, then exploding.
    rates = [10 ** (-6 + 6 * i / 199) for i in range(200)]
    losses = [2.3 - 2.0 / (1 + math.exp(-3 * (math.log10(r) + 3))) for r in rates]
    lowest = rates[min(range(200), key=lambda i: losses[i] if rates[i] < 0.03 else 9)]
    suggested = steepest(list(zip(rates, losses, strict=True)), lowest)
    assert 5e-4 < suggested < 2e-3
    assert steepest([(1e-3, 1.0), (2e-3, 0.9)], 2e-3) == pytest.approx(2e-4)


def test_crop_augmentation_never_mirrors():
    import torch

    from ftune.models.data.transforms import augment

    torch.manual_seed(0)
    batch = torch.zeros(64, 3, 32, 32)
    batch[:, :, :, :8] = 255.0  # a bar on the left edge
    for level, mirrored_expected in (("crop", False), ("light", True)):
        out = augment(batch, 32, level)
        right_heavy = out[:, :, :, 16:].mean(dim=(1, 2, 3)) > out[:, :, :, :16].mean(
            dim=(1, 2, 3))
        assert bool(right_heavy.any()) is mirrored_expected, level


def test_a_warmup_longer_than_the_auto_epochs_shrinks_to_fit():
    spec = parse_spec({"schedule": {"warmup_epochs": 3}})
    resolved = resolve_static(spec, _stats({"a": 15_000, "b": 15_000}))
    assert resolved["epochs"]["value"] == 2
    filled = apply_static(spec, resolved)
    assert filled.epochs == 2 and filled.schedule.warmup_epochs == 2


@pytest.mark.parametrize(("spec", "dropout"), [
    ({}, rules.HEAD_DROPOUT), ({"preset": "fast"}, 0.0),
    ({"freeze": {"strategy": "head_only"}}, 0.0),
    ({"freeze": {"strategy": "none"}}, rules.HEAD_DROPOUT),
    ({"preset": "fast", "head": {"dropout": 0.5}}, 0.5)])
def test_head_dropout_is_off_only_when_the_head_trains_alone(spec, dropout):
    parsed = parse_spec(spec)
    resolved = resolve_static(parsed, _stats({"a": 100, "b": 120}))
    assert apply_static(parsed, resolved).head.dropout == dropout
    assert ("head.dropout" in resolved) == ("dropout" not in spec.get("head", {}))


@pytest.mark.parametrize(("asked", "head_alone_cached", "val_carved", "expected"), [
    ("auto", True, True, True), ("auto", True, False, False), ("auto", False, True, False),
    (True, True, False, True), (False, True, True, False), (True, False, True, False)])
def test_refit_only_a_cached_head_and_by_default_only_on_a_carved_val_split(
        asked, head_alone_cached, val_carved, expected):
    assert rules.refit(asked, head_alone_cached=head_alone_cached,
                       val_carved=val_carved) is expected


@pytest.mark.parametrize("spec", [{"refit": True},
                                  {"refit": True, "preset": "fast", "augment": "light"},
                                  {"refit": True, "freeze": {"strategy": "none"}}])
def test_refit_true_without_a_cached_head_is_refused_naming_the_field(spec):
    with pytest.raises(ValueError, match="refit: true needs the head trained alone"):
        parse_spec(spec)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_spec_knows_which_presets_train_the_head_alone(preset):
    # FineTuneSpec.head_alone cannot import the presets (they import the spec): held here.
    assert parse_spec({"preset": preset}).head_alone is not PRESETS[preset].finetune
    assert parse_spec({"preset": preset, "freeze": {"strategy": "head_only"}}).head_alone
    assert not parse_spec({"preset": preset, "freeze": {"strategy": "none"}}).head_alone


def test_a_new_head_is_initialised_as_at_the_start_from_its_seed():
    import torch

    from ftune.models.network import OUTPUT_INIT_STD, build_head, reinit_head
    from ftune.models.spec import HeadSpec

    spec = HeadSpec(hidden=[16], batchnorm=True, dropout=0.2)
    head = build_head(32, 5, spec)
    with torch.no_grad():
        for param in head.parameters():
            param.add_(1.0)  # as if trained
    state = torch.get_rng_state()
    reinit_head(head, spec, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the run's random stream is untouched
    first = {k: v.clone() for k, v in head.state_dict().items()}
    reinit_head(head, spec, seed=3)
    assert all(torch.equal(first[k], v) for k, v in head.state_dict().items())
    output = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert torch.all(output.bias == 0) and output.weight.std() < 3 * OUTPUT_INIT_STD
    norm = next(m for m in head.modules() if isinstance(m, torch.nn.BatchNorm1d))
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    reinit_head(head, spec, seed=4)
    assert not torch.equal(first["1.weight"], head.state_dict()["1.weight"])


def test_choices_report_every_choice_as_value_and_why_and_never_change_the_callers_dict():
    given = {"epochs": {"value": 3, "why": "at most 3"}}
    reports: list[dict] = []
    choices = Choices(given, on_resolved=reports.append)
    assert choices.record("augment", rules.Choice("crop", "many epochs")) == "crop"
    choices.record("epochs", rules.Choice(2, "capped"))
    assert reports == []  # recorded, not yet reported: a report is a database write
    choices.notify()
    assert reports == [{"epochs": {"value": 2, "why": "capped"},
                        "augment": {"value": "crop", "why": "many epochs"}}]
    assert given == {"epochs": {"value": 3, "why": "at most 3"}}
    reports[0]["augment"]["value"] = "none"  # what was reported is a copy, too
    assert choices.value("augment") == "crop"


def test_a_choice_with_details_stores_them_beside_value_and_why():
    choice = rules.pretrain("autoencoder", "all", key="k", reused=True, epochs=0, images=30,
                            unlabeled=20, size=96, stages=2, losses=[])
    stored = Choices()
    stored.record("pretrain", choice)
    made = stored.to_dict()["pretrain"]
    assert list(made) == ["value", "key", "reused", "images", "unlabeled_images", "size",
                          "stages", "loss", "why"]
    assert "20 unlabelled and 10 training images" in made["why"]
    assert stored.choice("pretrain") == choice


def test_the_static_fields_and_apply_static_come_from_one_table():
    from ftune.models.recipe.resolve import STATIC_FIELDS, STATIC_TABLE

    resolved = resolve_static(FineTuneSpec(), _stats({"a": 100, "b": 120}))
    assert list(resolved) == [name for name in STATIC_FIELDS if name in resolved]  # in order
    filled = apply_static(FineTuneSpec(), resolved).model_dump()
    for field in STATIC_TABLE:
        if field.fills_spec and field.name in resolved:
            *parents, leaf = field.name.split(".")
            node = filled
            for parent in parents:
                node = node[parent]
            assert node[leaf] == resolved[field.name]["value"], field.name


def test_patience_waits_long_on_the_head_and_lets_fine_tuning_finish():
    assert rules.patience("head", BALANCED, 40).value == BALANCED.head_patience
    assert rules.patience("finetune", BALANCED, 9).value == 9
    assert rules.patience("finetune", BALANCED, 1).value == BALANCED.finetune_patience
    assert rules.patience("train", BALANCED, 9).value == rules.DEFAULT_PATIENCE


def test_mixed_precision_autocasts_only_on_gpus():
    assert rules.mixed_precision("cpu", False).value == "off"
    assert rules.mixed_precision("cuda", True).value == "bf16"
    assert rules.mixed_precision("cuda", False).value == "fp16"


def test_pretraining_adapts_the_top_two_stages_unless_asked_never_more_than_there_are():
    assert rules.pretrain_stages("auto", 7).value == rules.PRETRAIN_STAGES
    assert rules.pretrain_stages(9, 7).value == 7
    assert rules.pretrain_size("auto", 96).value == 96
    assert rules.pretrain_size(64, 96).value == 64


def test_finetune_stops_when_its_pace_cannot_close_the_gap_to_the_head():
    head = [0.9, 0.5, 0.42, 0.43]
    # Best 0.55 after 4 of 11 epochs, 0.01 a epoch over the last two: 7 left close 0.07 < 0.13.
    stopped = rules.finetune_futile([0.8, 0.57, 0.56, 0.55], head, 11)
    assert stopped is not None and stopped.value == 4
    assert "after 4 of its 11 epochs" in stopped.why and "0.42" in stopped.why
    # Improving fast enough to close it: goes on.
    assert rules.finetune_futile([0.9, 0.7, 0.55, 0.45], head, 11) is None
    # Already better than the head: goes on (early stopping judges it from there).
    assert rules.finetune_futile([0.6, 0.45, 0.41, 0.44], head, 11) is None


def test_finetune_is_judged_only_after_3_epochs_with_2_left():
    head, stalled = [0.3], [0.9, 0.9, 0.9]
    assert rules.finetune_futile(stalled[:2], head, 10) is None  # too early to judge
    assert rules.finetune_futile(stalled, head, 4) is None  # 1 left: its best epochs are last
    assert rules.finetune_futile(stalled, head, 5) is not None


def test_finetune_futility_follows_a_metric_where_higher_is_better():
    head = [0.80, 0.90]
    assert rules.finetune_futile([0.5, 0.6, 0.61, 0.615], head, 10, metric="val_accuracy",
                                 higher_is_better=True) is not None
    assert rules.finetune_futile([0.5, 0.7, 0.85], head, 10, metric="val_accuracy",
                                 higher_is_better=True) is None


def test_fine_tuning_is_skipped_when_the_head_gets_every_one_of_enough_val_images_right():
    skipped = rules.head_suffices(1.0, 32, BALANCED)
    assert skipped is not None and skipped.value == 0
    assert "all 32 val images right" in skipped.why and "preset best" in skipped.why
    assert rules.head_suffices(31 / 32, 32, BALANCED) is None  # one wrong: fine-tune
    assert rules.head_suffices(1.0, rules.HEAD_SUFFICES_MIN_VAL - 1, BALANCED) is None
    assert rules.head_suffices(1.0, 5000, PRESETS["best"]) is None  # best always fine-tunes


def test_refit_says_whether_early_stopping_or_the_stage_limit_chose_the_epochs():
    assert "early stopping chose" in rules.refit_choice(100, 12, capped=False).why
    capped = rules.refit_choice(100, 40, capped=True).why
    assert "early stopping" not in capped and "still improving" in capped


def test_range_test_reason_says_when_the_loss_never_turned_up():
    from ftune.models.training.lr_finder import RangeTest

    never_turned = RangeTest(0.003, 1.0, [], 200).why()
    assert "still falling near the test's highest rate" in never_turned
    assert "lowest at 1" not in never_turned
    assert "lowest at 0.05" in RangeTest(0.003, 0.05, [], 120).why()
