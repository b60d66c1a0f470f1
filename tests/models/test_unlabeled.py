"""Unlabelled images: where a dataset holds them and what lint says, then what training does
with them: pretraining (both methods, resumed after a stop, reused from the store) and
pseudo-labels, with validation and test images kept out of both."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ftune.models.backbones import create_backbone
from ftune.models.data.discover import inspect_dataset, scan_image_folder
from ftune.models.derived.store import DerivedStore
from ftune.models.errors import DatasetError, TrainingCancelled
from ftune.models.training.checkpoint import last_history, load_checkpoint
from ftune.models.training.fit import Callbacks, fit
from ftune.models.training.unlabeled import select_confident, unlabeled_of
from ftune.testing.realdata import balanced_indices, write_image_folder

SPEC = {"preset": "fast", "image_size": 32, "batch_size": 16}


def _save(folder: Path, images: np.ndarray, prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{prefix}{i:04d}.png")


@pytest.fixture(scope="module")
def low_label(tmp_path_factory, animal_arrays) -> Path:
    """train/ (3 classes x 8), val/ and test/ (3 x 4), and unlabeled/ with 45 new images
    plus a copy of every val and test image."""
    images, labels = animal_arrays
    root = tmp_path_factory.mktemp("lowlabel") / "data"
    for split, per_class, offset in (("train", 8, 0), ("val", 4, 8), ("test", 4, 12)):
        idx = balanced_indices(labels, per_class, offset=offset, classes=3)
        write_image_folder(root / split, images[idx], labels[idx])
    _save(root / "unlabeled", images[balanced_indices(labels, 15, offset=40, classes=3)], "u")
    for split in ("val", "test"):
        for i, path in enumerate(sorted((root / split).rglob("*.png"))):
            shutil.copy(path, root / "unlabeled" / f"copy-{split}-{i}.png")
    return root


def test_unlabeled_images_beside_the_classes_are_no_class(tmp_path, animal_arrays):
    images, labels = animal_arrays
    idx = balanced_indices(labels, 6, classes=2)
    write_image_folder(tmp_path / "d", images[idx], labels[idx])
    _save(tmp_path / "d" / "unlabeled" / "batch1", images[100:110], "u")
    shutil.copy(next((tmp_path / "d" / "animal0").iterdir()), tmp_path / "d" / "unlabeled")
    inspection = inspect_dataset(tmp_path / "d")
    report = inspection.report.to_dict()
    assert inspection.index.classes == ["animal0", "animal1"] and report["ok"]
    assert len(inspection.index.unlabeled) == 10 and report["unlabeled"] == {"images": 10}
    copies = [w for w in report["warnings"] if w["code"] == "unlabeled_copies"]
    assert copies and copies[0]["count"] == 1 and "held-out" in copies[0]["action"]
    # Unlabelled images do not change the labelled content hash.
    shutil.rmtree(tmp_path / "d" / "unlabeled")
    assert scan_image_folder(tmp_path / "d").content_hash == inspection.index.content_hash


def test_a_class_named_unlabeled_is_a_lint_error(tmp_path, animal_arrays):
    images, labels = animal_arrays
    idx = balanced_indices(labels, 6, classes=2)
    write_image_folder(tmp_path / "d" / "train", images[idx], labels[idx],
                       classes=["cat", "Unlabeled"])
    report = inspect_dataset(tmp_path / "d").report.to_dict()
    errors = [e for e in report["errors"] if e["code"] == "reserved_name"]
    assert not report["ok"] and errors and "reserved" in errors[0]["message"]
    assert "unlabeled/ folder" in errors[0]["action"]


def test_a_dataset_of_kind_unlabeled_needs_no_classes(tmp_path, animal_arrays):
    images, _ = animal_arrays
    _save(tmp_path / "u" / "a" / "b", images[:7], "x")
    (tmp_path / "u" / "notes.txt").write_text("not an image")
    index = scan_image_folder(tmp_path / "u", kind="unlabeled")
    assert index.classes == [] and len(index.unlabeled) == 7 and index.unlabeled_hash
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no usable image"):
        scan_image_folder(tmp_path / "empty", kind="unlabeled")


def test_copies_of_val_and_test_images_never_reach_pretraining(low_label, tmp_path,
                                                               animal_arrays):
    index = scan_image_folder(low_label)
    assert len(index.unlabeled) == 45  # the 24 copies of val and test images are left out
    images, _ = animal_arrays
    _save(tmp_path / "extra", images[2000:2005], "e")
    shutil.copy(next((low_label / "test").rglob("*.png")), tmp_path / "extra")
    extra = scan_image_folder(tmp_path / "extra", kind="unlabeled")
    assert len(extra.unlabeled) == 6
    held_out = {s.sha256 for s in [*index.val, *index.test]}
    found = unlabeled_of(index, extra)
    assert len(found) == 50 and not held_out & {s.sha256 for s in found}


def test_confident_pseudo_labels_are_balanced_per_class():
    probabilities = torch.tensor([[0.95, 0.05], [0.97, 0.03], [0.99, 0.01], [0.2, 0.8],
                                  [0.05, 0.95], [0.6, 0.4]])
    indices, labels, counts = select_confident(probabilities, 0.9, None)
    assert counts == [1, 1] and sorted(zip(indices, labels, strict=True)) == [(2, 0), (4, 1)]
    indices, labels, counts = select_confident(probabilities, 0.7, None)
    assert counts == [2, 2] and set(indices) == {1, 2, 3, 4}
    assert select_confident(probabilities, 0.7, 1)[2] == [1, 1]
    assert select_confident(probabilities, 0.999, None) == ([], [], [0, 0])


def test_pretraining_without_unlabelled_images_is_refused(tiny_folder):
    with pytest.raises(DatasetError, match=r"pretrain\.method needs unlabelled images"):
        fit(tiny_folder, {**SPEC, "pretrain": {"method": "autoencoder"}})


@pytest.mark.parametrize("method", ["autoencoder", "contrastive"])
def test_pretraining_adapts_resumes_after_a_stop_and_is_reused(low_label, tmp_path, method):
    store = DerivedStore(tmp_path / "store", 10**10)
    spec = {**SPEC, "pretrain": {"method": method, "epochs": 2, "batch_size": 16}}
    first: list[dict] = []
    with pytest.raises(TrainingCancelled):  # stopped once the first epoch is checkpointed
        fit(low_label, spec, checkpoint_dir=tmp_path / "ckpt", derived=store,
            callbacks=Callbacks(on_pretrain_epoch=first.append,
                                should_stop=lambda: bool(first)))
    assert [row["epoch"] for row in first] == [1]
    resumed: list[dict] = []
    result = fit(low_label, spec, checkpoint_dir=tmp_path / "ckpt", derived=store,
                 callbacks=Callbacks(on_pretrain_epoch=resumed.append))
    assert [row["epoch"] for row in resumed] == [2]  # epoch 1 came from the checkpoint
    choice = result.resolved["pretrain"]
    assert choice["reused"] is False and len(choice["loss"]) == 2
    assert choice["unlabeled_images"] == 45 and choice["images"] == 45 + 24
    assert [row["epoch"] for row in result.pretrain_history] == [1, 2]
    pristine = create_backbone(result.backbone, pretrained=True, image_size=32).model.state_dict()
    adapted = result.model.backbone.state_dict()
    changed = [name for name, value in pristine.items()
               if value.dtype.is_floating_point and not torch.equal(value, adapted[name])]
    assert any("running_mean" in name for name in changed)  # BatchNorm followed the domain
    assert "bn1.running_mean" not in changed  # in the adapting stages only, by default
    assert any(name.startswith("conv_head") or "blocks.6" in name for name in changed)
    assert not any(name.startswith("conv_stem.weight") for name in changed)  # stages frozen
    stages: list[str] = []
    again = fit(low_label, spec, derived=store, callbacks=Callbacks(
        on_stage=lambda stage, *_: stages.append(stage)))
    assert again.resolved["pretrain"]["reused"] and "pretrain" not in stages
    assert again.resolved["pretrain"]["key"] == choice["key"]
    for name, value in again.model.backbone.state_dict().items():
        if "running" in name or "weight" in name:
            assert torch.equal(value, adapted[name]), name


def test_pseudo_labels_join_training_only(low_label):
    stages: list[str] = []
    result = fit(low_label, {**SPEC, "pseudo_labels": {"rounds": 2, "threshold": 0.2}},
                 callbacks=Callbacks(on_stage=lambda stage, *_: stages.append(stage)))
    rounds = result.resolved["pseudo_labels"]["value"]
    assert [r["round"] for r in rounds] == [1, 2] and stages.count("pseudo_labels") == 2
    for r in rounds:
        counts = list(r["per_class"].values())
        assert 0 < r["images"] == sum(counts) <= 45 and len(set(counts)) == 1
    # Validation is the 12 val images alone; pseudo-labelled epochs follow the first ones.
    assert result.num_val == 12 and result.evaluation["val"]["num_images"] == 12
    assert len(result.history) >= rounds[1]["first_epoch"] > rounds[0]["first_epoch"] > 1


def test_pseudo_label_rounds_are_checkpointed_and_never_repeated(low_label, tmp_path):
    spec = {**SPEC, "pseudo_labels": {"rounds": 2, "threshold": 0.2}}
    whole = fit(low_label, spec, checkpoint_dir=tmp_path / "a")
    rounds = whole.resolved["pseudo_labels"]["value"]
    second = rounds[1]["first_epoch"]
    assert len(whole.history) > second + 1  # round 2 has epochs to stop between
    stages: list[str] = []
    with pytest.raises(TrainingCancelled):  # stopped as round 2 labels its images
        fit(low_label, spec, checkpoint_dir=tmp_path / "b", callbacks=Callbacks(
            on_stage=lambda stage, *_: stages.append(stage),
            should_stop=lambda: stages.count("pseudo_labels") == 2))
    saved = load_checkpoint(tmp_path / "b" / "pseudo_labels")
    assert saved["pseudo_labels"]["round"] == 1 and saved["epoch"] == second - 1
    assert len(saved["pseudo_labels"]["indices"]) == rounds[0]["images"] > 0
    # The run's own checkpoint still ends with its stages: the rounds' are kept beside it.
    assert load_checkpoint(tmp_path / "b")["epoch"] == rounds[0]["first_epoch"] - 1
    rows: list[dict] = []
    with pytest.raises(TrainingCancelled):  # resumed, then stopped within round 2
        fit(low_label, spec, checkpoint_dir=tmp_path / "b", resume=tmp_path / "b",
            callbacks=Callbacks(on_epoch_end=rows.append,
                                should_stop=lambda: len(rows) == 2))
    assert [row["epoch"] for row in rows] == [second, second + 1]  # round 1 was not repeated
    assert load_checkpoint(tmp_path / "b" / "pseudo_labels")["pseudo_labels"]["round"] == 2
    # What a worker records of a cut-off attempt: its round's epochs too.
    assert [row["epoch"] for row in last_history(tmp_path / "b")] == list(range(1, second + 2))
    rows.clear()
    resumed = fit(low_label, spec, checkpoint_dir=tmp_path / "b", resume=tmp_path / "b",
                  callbacks=Callbacks(on_epoch_end=rows.append))
    # The rest of round 2 on the images it had labelled, as if never stopped.
    assert resumed.resolved["pseudo_labels"]["value"] == rounds
    assert [row["epoch"] for row in rows] == list(range(second + 2, len(whole.history) + 1))
    assert [row["epoch"] for row in resumed.history] == list(range(1, len(whole.history) + 1))
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
    for a, b in zip(whole.history, resumed.history, strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["epoch"], key)
    for (name, a), b in zip(whole.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
    assert resumed.best_epoch == whole.best_epoch
    assert resumed.evaluation["test"]["accuracy"] == whole.evaluation["test"]["accuracy"]


def test_ftune_train_takes_a_folder_of_unlabelled_images(tiny_folder, animal_arrays, tmp_path,
                                                         capsys):
    import json

    from ftune.models.cli import main

    images, _ = animal_arrays
    _save(tmp_path / "pool" / "x", images[3000:3030], "p")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**SPEC, "pretrain": {"method": "contrastive", "epochs": 1,
                                                     "batch_size": 16}}))
    out = tmp_path / "model"
    assert main(["train", str(tiny_folder), "--spec", str(spec), "--out", str(out),
                 "--unlabeled", str(tmp_path / "pool"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "stage pretrain" in printed and "pretrain epoch 1 (contrastive): loss" in printed
    assert "auto pretrain = contrastive" in printed and "30 unlabelled" in printed


def test_few_labels_and_many_unlabelled_images_get_advice_and_a_finding():
    from ftune.models.diagnosis import diagnose
    from ftune.models.recipe.resolve import resolve_static
    from ftune.models.recipe.stats import DatasetStats
    from ftune.models.spec import FineTuneSpec

    few = DatasetStats({"a": 8, "b": 9}, 28, unlabeled=500)
    advice = resolve_static(FineTuneSpec(), few)["unlabeled"]
    assert advice["value"] == "pseudo_labels" and "8 labelled images" in advice["why"]
    assert "500 unlabelled" in advice["why"] and "bench/unlabeled.py" in advice["why"]
    for stats in (DatasetStats({"a": 60, "b": 60}, 28, unlabeled=5000),  # labels enough
                  DatasetStats({"a": 8, "b": 9}, 28, unlabeled=10)):  # few unlabelled
        assert "unlabeled" not in resolve_static(FineTuneSpec(), stats)
    history = [{"epoch": 1, "train_loss": 0.6, "val_loss": 0.6}]
    found = diagnose(history, num_classes=2, unlabeled_advice=advice)
    assert [f["code"] for f in found] == ["unlabeled_unused"]
    assert "pseudo_labels" in found[0]["action"] and found[0]["evidence"] == advice["why"]
    assert diagnose(history, num_classes=2, unlabeled_advice=advice, uses_unlabeled=True) == []
