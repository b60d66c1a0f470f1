"""The default recipe: ``{}`` beats the old default, auto choices are deterministic, class
weights help a 10:1 imbalance, the time budget ends runs with their best weights, and a
two-stage run resumes from its checkpoint."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ftune.models.errors import TrainingCancelled
from ftune.models.network import build_head
from ftune.models.parallel.launch import Devices, fit_on_devices
from ftune.models.recipe.choices import Choices
from ftune.models.spec import HeadSpec, parse_spec
from ftune.models.training.budget import Budget
from ftune.models.training.checkpoint import load_checkpoint
from ftune.models.training.fit import Callbacks, fit
from ftune.testing.realdata import balanced_indices, write_faces, write_image_folder

# What ``{}`` meant before the default recipe: plain SGD, head only, 10 epochs, 224 px.
OLD_DEFAULT = {"image_size": None, "epochs": 10, "freeze": {"strategy": "head_only"},
               "optimizer": {"name": "sgd", "lr": 0.001, "layer_decay": None},
               "schedule": {"name": "constant"}, "augment": "none", "class_weights": "none",
               "early_stopping": {"patience": 3}}


def _heldout_accuracy(result, heldout) -> float:
    from ftune.models.predictor import Predictor

    predictor = Predictor(result.model, result.classes, result.preprocessing,
                          torch.device("cpu"))
    images, labels = heldout  # labels are class names
    predicted = predictor.predict(list(images), top_k=1)
    return float(np.mean([p[0]["label"] == y for p, y in zip(predicted, labels, strict=True)]))


@pytest.fixture(scope="module")
def empty_spec_run(animal_folder):
    """``{}`` on the animal images, in this process (on the CPU here)."""
    return fit(animal_folder, {})


def test_empty_spec_clearly_beats_the_old_default(animal_folder, animal_heldout,
                                                  empty_spec_run):
    new = empty_spec_run
    old = fit(animal_folder, OLD_DEFAULT)
    new_acc, old_acc = (_heldout_accuracy(r, animal_heldout) for r in (new, old))
    assert new_acc >= old_acc + 0.05, (new_acc, old_acc)
    assert new.resolved["image_size"]["value"] == 96  # 28 px silhouettes
    assert {row["stage"] for row in new.history} == {"head", "finetune"}
    assert new.lr_curve and new.resolved["optimizer.lr"]["why"].startswith("learning-rate")


def test_a_head_that_gets_every_val_image_right_is_not_fine_tuned(tmp_path):
    # lfw_subset's faces and non-faces: pretrained features separate all 32 val images.
    result = fit(write_faces(tmp_path / "faces"), {})
    assert {row["stage"] for row in result.history} == {"head"}
    assert max(row["val_accuracy"] for row in result.history) == 1.0
    skipped = result.resolved["finetune.epochs"]
    assert skipped["value"] == 0 and "all 32 val images right" in skipped["why"]
    assert result.evaluation["test"]["accuracy"] >= 0.95


def test_auto_choices_are_deterministic_given_data_and_seed(tiny_folder):
    spec = {"preset": "fast", "image_size": 32}
    first, second = fit(tiny_folder, spec), fit(tiny_folder, spec)
    assert first.resolved == second.resolved and first.lr_curve == second.lr_curve
    assert [r["val_loss"] for r in first.history] == [r["val_loss"] for r in second.history]
    assert set(first.resolved) >= {"optimizer.lr", "optimizer.name", "epochs", "class_weights"}


@pytest.fixture(scope="module")
def fast_refit_run(tiny_folder):
    return fit(tiny_folder, {"preset": "fast", "image_size": 32})


def test_fast_refits_the_head_on_train_and_val_keeping_val_metrics_from_before(
        tiny_folder, fast_refit_run):
    spec = {"preset": "fast", "image_size": 32}
    refit, plain = fast_refit_run, fit(tiny_folder, spec | {"refit": False})
    assert "refit" not in plain.resolved
    choice = refit.resolved["refit"]
    assert choice["value"] is True
    assert f"({refit.num_train + refit.num_val} images)" in choice["why"]
    assert f"for the {plain.best_epoch} epoch(s)" in choice["why"]
    # The same head stage chose the epochs; val is scored before the refit, the model after.
    assert refit.evaluation["val"] == plain.evaluation["val"]
    assert [r["val_loss"] for r in refit.history] == [r["val_loss"] for r in plain.history]
    assert not torch.equal(refit.model.head[-1].weight, plain.model.head[-1].weight)


def test_an_explicit_val_split_is_not_refit_by_default(tmp_path, animal_arrays):
    images, labels = animal_arrays
    root = tmp_path / "data"
    write_image_folder(root / "train", *(a[balanced_indices(labels, 8, classes=3)]
                                         for a in (images, labels)))
    write_image_folder(root / "val", *(a[balanced_indices(labels, 4, classes=3, offset=8)]
                                       for a in (images, labels)))
    result = fit(root, {"preset": "fast", "image_size": 32})
    assert "refit" not in result.resolved and result.num_val == 12


def test_the_output_layer_starts_small_so_the_first_loss_is_about_ln_c():
    torch.manual_seed(0)
    head = build_head(1280, 10, HeadSpec(hidden=[256]))
    features = torch.relu(torch.randn(512, 1280) * 3)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(head.eval()(features),
                                                 torch.randint(10, (512,)))
    assert abs(loss.item() - math.log(10)) < 0.15
    hidden = head[1]  # Dropout, Linear(1280, 256): He init stays for hidden layers
    assert float(hidden.weight.std()) == pytest.approx(math.sqrt(2 / 1280), rel=0.1)


def _imbalanced_folder(root: Path, arrays) -> Path:
    """Classes 0-2 with 120 training images each, class 3 with 12 (10:1); balanced val and
    test splits of 30 each."""
    images, labels = arrays
    for split, per_class, offset in (("train", 120, 0), ("val", 30, 120), ("test", 30, 150)):
        idx = balanced_indices(labels, per_class, offset=offset, classes=4)
        if split == "train":
            idx = np.concatenate([idx[labels[idx] != 3], idx[labels[idx] == 3][:12]])
        write_image_folder(root / split, images[idx], labels[idx])
    return root


def test_balanced_class_weights_for_a_10_to_1_imbalance_raise_macro_f1(tmp_path,
                                                                        animal_arrays):
    data = _imbalanced_folder(tmp_path / "data", animal_arrays)
    f1: dict[str, list[float]] = {"balanced": [], "none": []}
    for seed in range(3):  # one seed's 120 test images are too few to tell reliably
        spec = {"preset": "fast", "image_size": 64, "seed": seed}
        weighted = fit(data, spec)
        unweighted = fit(data, {**spec, "class_weights": "none"})
        assert weighted.resolved["class_weights"]["value"] == "balanced"
        assert "10.0x" in weighted.resolved["class_weights"]["why"]
        f1["balanced"].append(weighted.evaluation["test"]["macro_f1"])
        f1["none"].append(unweighted.evaluation["test"]["macro_f1"])
    assert np.mean(f1["balanced"]) > np.mean(f1["none"]), f1


def test_a_time_budget_ends_the_run_with_its_best_weights(tiny_folder):
    # 10 ms: spent before the first epoch ends on any machine (decoding alone takes longer).
    result = fit(tiny_folder, {"image_size": 32, "time_budget_s": 0.01})
    budget = result.resolved["time_budget_s"]
    assert budget["value"] == 0.01 and budget["why"].startswith("the spec's time_budget_s")
    # Spent by the time the head's first epoch ends: no more epochs, no fine-tuning stage.
    assert "it ended training after epoch 1," in budget["why"]
    assert [row["stage"] for row in result.history] == ["head"]
    assert result.best_metrics["val_loss"] is not None and result.evaluation["val"]
    # The best weights are a head on cached features: refit on train+val like preset fast.
    assert "for the 1 epoch(s)" in result.resolved["refit"]["why"]


def test_a_resumed_run_counts_what_earlier_attempts_spent_against_the_budget():
    spec = parse_spec({"time_budget_s": 100})
    now = time.perf_counter()
    fresh = Budget.start(spec, Choices(), None, now)
    resumed = Budget.start(spec, Choices(), None, now, spent_before=60)
    assert fresh.left() - resumed.left() == pytest.approx(60, abs=0.5)
    # Capped by the job's remaining run time (80% of 50 s): earlier attempts are already out.
    capped = Budget.start(spec, Choices(), 50, now, spent_before=60)
    assert capped.seconds == 40 and capped.spent_before == 0


def test_without_a_val_split_the_fine_tuning_stage_is_judged_on_its_own(tiny_folder):
    """Training loss is watched then; augmented fine-tuning starts above the head's last
    value, which must not make the head's weights the result."""
    result = fit(tiny_folder, {"image_size": 32, "batch_size": 8, "epochs": 2,
                               "val_fraction": 0})
    stages = [row["stage"] for row in result.history]
    assert stages.count("finetune") == 2 and result.num_val == 0
    assert result.history[result.best_epoch - 1]["stage"] == "finetune"


def test_a_two_stage_run_resumes_in_its_second_stage(tiny_folder, tmp_path):
    spec = {"image_size": 32, "batch_size": 8, "epochs": 3}
    whole = fit(tiny_folder, spec)
    stages_seen: list[str] = []

    def stop_in_finetune() -> bool:
        return stages_seen.count("finetune") > 0 and len(finished) >= len(head_rows) + 1

    head_rows = [r for r in whole.history if r["stage"] == "head"]
    finished: list[dict] = []
    with pytest.raises(TrainingCancelled):
        fit(tiny_folder, spec, checkpoint_dir=tmp_path,
            callbacks=Callbacks(on_epoch_end=finished.append, should_stop=stop_in_finetune,
                                on_stage=lambda stage, *_: stages_seen.append(stage)))
    resumed = fit(tiny_folder, spec, checkpoint_dir=tmp_path, resume=tmp_path)
    assert [r["epoch"] for r in resumed.history] == list(range(1, len(whole.history) + 1))
    assert [r["stage"] for r in resumed.history] == [r["stage"] for r in whole.history]
    assert resumed.resolved == whole.resolved
    for a, b in zip(resumed.history, whole.history, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4, abs=1e-5)
    # The best weights (perhaps the head stage's, saved head-only) come back whole.
    for (name, a), b in zip(whole.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def test_head_stage_checkpoints_hold_only_the_head_and_resume_exactly(tiny_folder, tmp_path):
    """While the backbone is as built, an epoch writes the head's weights, not the network's;
    a run stopped in its head stage resumes to the uninterrupted run's result."""
    spec = {"image_size": 32, "batch_size": 8, "epochs": 2}
    whole = fit(tiny_folder, spec)

    def stop_in_head(row: dict) -> None:
        if row["epoch"] == 2:
            raise TrainingCancelled("stopped")

    with pytest.raises(TrainingCancelled):
        fit(tiny_folder, spec, checkpoint_dir=tmp_path,
            callbacks=Callbacks(on_epoch_end=stop_in_head))
    saved = load_checkpoint(tmp_path)
    assert saved["backbone_as_built"] and saved["stage_index"] == 0
    assert saved["budget_spent_s"] > 0  # a resumed run counts it against the time budget
    assert saved["model"] and all(k.startswith("head.") for k in saved["model"])
    assert (tmp_path / "checkpoint.pt").stat().st_size < 200_000  # the network is ~14 MB
    resumed = fit(tiny_folder, spec, checkpoint_dir=tmp_path, resume=tmp_path)
    assert [r["stage"] for r in resumed.history] == [r["stage"] for r in whole.history]
    for a, b in zip(resumed.history, whole.history, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4, abs=1e-5)
    for (name, a), b in zip(whole.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
    final = load_checkpoint(tmp_path)  # fine-tuning changed the backbone: all of it is kept
    assert not final["backbone_as_built"]
    assert final["model"].keys() == whole.model.state_dict().keys()


def test_the_default_recipe_on_two_ranks_makes_the_one_process_model(
        tmp_path, animal_folder, animal_arrays, empty_spec_run, tiny_folder, fast_refit_run):
    """Features, head, fine-tuning (and, with preset fast, refit) under 2 gloo ranks."""
    images, labels = animal_arrays
    idx = balanced_indices(labels, 30, offset=50)  # 300 images neither run has seen
    heldout = images[idx], [empty_spec_run.classes[int(y)] for y in labels[idx]]
    two = fit_on_devices(Devices(2, "cpu"), animal_folder, parse_spec({}),
                         folder=tmp_path / "ranks", checkpoint_dir=tmp_path / "ckpt")
    stages = [row["stage"] for row in two.history]
    assert stages == [row["stage"] for row in empty_spec_run.history]
    assert {"head", "finetune"} <= set(stages)
    one_acc, two_acc = (_heldout_accuracy(r, heldout) for r in (empty_spec_run, two))
    # Two ranks are not bit-identical to one process (the all-reduce sums in another order),
    # and the difference grows over a run of many epochs: measured 1 and 2 images of 300 in
    # two runs. The bound is 4 images (1.3 points), the noise of two such runs, not 0.5 points
    # (1.5 images), which one run in a few missed.
    assert round(abs(one_acc - two_acc) * len(idx)) <= 4, (one_acc, two_acc)
    # The head alone on cached features, then refit on train+val, on rank 0.
    fast = fit_on_devices(Devices(2, "cpu"), tiny_folder,
                          parse_spec({"preset": "fast", "image_size": 32}),
                          folder=tmp_path / "fast", checkpoint_dir=tmp_path / "fast-ckpt")
    assert fast.resolved["refit"] == fast_refit_run.resolved["refit"]
    torch.testing.assert_close(fast.model.head[-1].weight,
                               fast_refit_run.model.head[-1].weight, rtol=1e-4, atol=1e-5)
