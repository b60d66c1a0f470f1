"""Multi-label training on real mosaics, and calibration (temperature scaling, thresholds)."""

from __future__ import annotations

import pytest
import torch

from ftune.models.bundle import save_bundle
from ftune.models.calibration import (
    best_f1_thresholds,
    calibrate,
    expected_calibration_error,
    fit_temperature,
)
from ftune.models.errors import DatasetError
from ftune.models.predictor import Predictor
from ftune.models.spec import SpecError, parse_spec
from ftune.models.tasks import TASKS, average_precision, mean_average_precision
from ftune.models.training.fit import fit

HEAD = {"image_size": 64, "batch_size": 16, "epochs": 6, "optimizer": {"name": "adam", "lr": 0.003},
        "freeze": {"strategy": "head_only"}}


@pytest.fixture(scope="module")
def trained(multilabel_folder, tmp_path_factory):
    result = fit(multilabel_folder, HEAD)
    bundle = save_bundle(result, tmp_path_factory.mktemp("ml") / "bundle")
    return result, bundle


def test_auto_detects_multi_label_and_learns_every_label(trained, multilabel_folder):
    result, _ = trained
    assert result.task == "multi_label" and result.classes == ["animal0", "animal1", "digit2"]
    assert all("val_map" in row for row in result.history)
    test = result.evaluation["test"]
    prevalence = sum(row["support"] for row in test["per_class"]) / (3 * test["num_images"])
    assert test["mean_average_precision"] > prevalence + 0.3  # chance mAP is the prevalence
    assert all(row["average_precision"] > 0.5 for row in test["per_class"])
    assert 0 < test["micro_f1"] <= 1 and 0 < test["macro_f1"] <= 1
    assert test["pr_curves"]["animal0"][-1][0] == 1.0  # the curve ends at full recall
    assert {"expected_calibration_error", "expected_calibration_error_uncalibrated"} <= set(test)
    worst = test["worst"][0]
    assert worst["path"].startswith("test/") and set(worst) >= {"missed", "false_positives"}
    assert len(result.calibration["thresholds"]) == 3
    assert "validation" in result.resolved["calibration"]["why"]
    # Thresholds are chosen on val: the head is not trained again on it.
    assert result.resolved["refit"]["value"] is False


def test_the_carved_val_split_holds_every_label(trained):
    result, _ = trained
    val = result.evaluation["val"]
    assert result.num_val == val["num_images"] > 0
    assert all(row["support"] > 0 for row in val["per_class"])


def test_the_saved_model_predicts_label_sets_with_its_thresholds(trained, multilabel_folder):
    result, bundle = trained
    predictor = Predictor.load(bundle)
    assert predictor.multi_label
    images = sorted((multilabel_folder / "test").glob("*.png"))[:6]
    probs = predictor.predict_proba(images)
    assert not torch.allclose(probs.sum(1), torch.ones(len(images)))  # sigmoids, not softmax
    out = predictor.predict(images)
    thresholds = result.calibration["thresholds"]
    for row, entry in zip(probs, out, strict=True):
        assert {s["label"] for s in entry["scores"]} == set(result.classes)
        over = [c for c, p, t in zip(result.classes, row.tolist(), thresholds, strict=True)
                if p >= t]
        assert entry["labels"] == over
    assert len(predictor.predict(images[:1], top_k=2)[0]["scores"]) == 2


def test_a_multi_label_dataset_refuses_single_label_and_pseudo_labels(multilabel_folder):
    with pytest.raises(DatasetError, match="task single_label needs one label per image"):
        fit(multilabel_folder, {**HEAD, "task": "single_label"})
    with pytest.raises(SpecError, match="pseudo_labels"):
        parse_spec({"task": "multi_label", "pseudo_labels": {"rounds": 1}})
    with pytest.raises(DatasetError, match="pseudo-label is the one class"):
        fit(multilabel_folder, {**HEAD, "pseudo_labels": {"rounds": 1}})


def test_a_val_split_without_labels_is_refused(multilabel_folder, tmp_path):
    import shutil

    root = shutil.copytree(multilabel_folder, tmp_path / "data")
    rows = (root / "labels.csv").read_text().splitlines()
    # Five test mosaics become a val split whose images carry no label.
    val = [f"{line.split(',')[0]},,val" for line in rows if line.endswith(",test")][:5]
    (root / "labels.csv").write_text("\n".join(rows + val) + "\n")
    with pytest.raises(DatasetError, match="val split's 5 image"):  # the lint error
        fit(root, HEAD)
    from ftune.models.data.discover import inspect_dataset

    index = inspect_dataset(root, min_per_class=1).index
    assert len(index.val or []) == 5  # the split is kept, not dropped for having no labels
    with pytest.raises(DatasetError, match="val split has no image with a label"):
        fit(index, HEAD)  # given the index itself, training refuses too


def test_a_single_label_dataset_can_train_as_multi_label(tiny_folder):
    result = fit(tiny_folder, {**HEAD, "epochs": 2, "task": "multi_label"})
    assert result.task == "multi_label" and "mean_average_precision" in result.evaluation["val"]


def test_average_precision_by_hand():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    # positives ranked 1st and 3rd: (1/1 + 2/3) / 2
    assert average_precision(scores, torch.tensor([1, 0, 1, 0])) == pytest.approx(5 / 6)
    assert average_precision(scores, torch.tensor([0, 0, 0, 0])) is None
    targets = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 1]])
    both = torch.stack([scores, scores], 1)
    # the second class's positives ranked 3rd and 4th: (1/3 + 2/4) / 2
    assert mean_average_precision(both, targets) == pytest.approx((5 / 6 + 5 / 12) / 2)


def test_thresholds_maximise_f1_and_a_class_without_positives_keeps_half():
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.1], [0.4, 0.3], [0.1, 0.05]])
    targets = torch.tensor([[1, 0], [1, 0], [0, 0], [0, 0]])
    thresholds, missing = best_f1_thresholds(probs, targets)
    assert thresholds[0] == pytest.approx(0.6)  # the lowest score it says yes to
    assert thresholds[1] == 0.5 and missing == [1]
    # Saturated scores: the threshold is a score itself, so no rounding moves it past one.
    close = torch.tensor([[0.99999988], [0.9999996], [1e-7]])
    (edge,), _ = best_f1_thresholds(close, torch.tensor([[1], [0], [0]]))
    assert (close[:, 0] >= edge).tolist() == [True, False, False]


def test_a_model_without_val_mistakes_gets_no_temperature():
    task = TASKS["single_label"]
    logits = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    result = calibrate(logits, logits.argmax(1), task)  # every val image right
    assert not result.kept and result.temperature == [1.0] and "mistake" in result.why


def test_average_precision_ranks_ties_together_as_scikit_learn_does():
    from sklearn.metrics import average_precision_score

    generator = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 5, (200,), generator=generator).float()  # many ties
    truth = torch.randint(0, 2, (200,), generator=generator)
    expected = average_precision_score(truth.numpy(), scores.numpy())
    assert average_precision(scores, truth) == pytest.approx(expected)
    flipped = torch.arange(199, -1, -1)
    assert average_precision(scores[flipped], truth[flipped]) == pytest.approx(expected)


@pytest.mark.parametrize("task_name", ["single_label", "multi_label"])
def test_temperature_scaling_undoes_overconfidence(task_name):
    task = TASKS[task_name]
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(2000, 4, generator=generator) * 2
    if task_name == "single_label":
        targets = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=generator)[:, 0]
    else:
        targets = torch.bernoulli(torch.sigmoid(true_logits), generator=generator)
    overconfident = true_logits * 3  # the same ranking, three times too sure
    fitted = fit_temperature(overconfident, targets, task)
    assert fitted[0] == pytest.approx(3.0, rel=0.15)
    result = calibrate(overconfident, targets, task)
    # Judged on images the temperature was not fitted on (each half from the other's fit).
    assert result.kept and result.val_ece_after < 0.5 * result.val_ece_before
    probs = task.probabilities(result.scale(overconfident))
    before = expected_calibration_error(task.probabilities(overconfident), targets, task)
    assert expected_calibration_error(probs, targets, task) < 0.5 * before
    if task_name == "single_label":  # the ranking, so the accuracy, is unchanged
        assert torch.equal(probs.argmax(1), overconfident.argmax(1))


def _drawn_from_own_probabilities(seed: int, n: int, sure: float
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(logits), then the logits made ``sure`` times too sure."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 10, generator=generator) * 3
    targets = torch.multinomial(torch.softmax(logits, 1), 1, generator=generator)[:, 0]
    return logits * sure, targets


def test_the_keep_rule_rarely_keeps_a_temperature_the_model_does_not_need():
    """A calibrated model's fitted temperature only chases the noise of 300 val images; a
    mildly over-confident one's should be kept most of the time."""
    task = TASKS["single_label"]
    calibrated = [calibrate(*_drawn_from_own_probabilities(seed, 300, 1.0), task, seed=seed)
                  for seed in range(20)]
    over = [calibrate(*_drawn_from_own_probabilities(seed, 300, 1.3), task, seed=seed)
            for seed in range(20)]
    # Measured: ECE alone kept 5 of the 20 calibrated ones; with the log loss, 2.
    assert sum(r.kept for r in calibrated) <= 3
    assert sum(r.kept for r in over) >= 14
    assert all(r.temperature == [1.0] for r in calibrated if not r.kept)
    assert any("within the noise" in r.why for r in calibrated)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exports_give_the_calibrated_sigmoids_and_carry_task_and_thresholds(
        trained, multilabel_folder, tmp_path, fmt):
    import json

    import onnxruntime as ort

    from ftune.models.export import EXTRA_FILE, export_model

    result, bundle = trained
    predictor = Predictor.load(bundle, device="cpu")
    images = sorted((multilabel_folder / "test").glob("*.png"))[:8]
    batch = predictor.to_uint8(images)
    expected = predictor.probabilities(batch).numpy()
    path = export_model(bundle, tmp_path / f"model.{fmt}", fmt)
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"images": batch.numpy()})[0]
        meta = session.get_modelmeta().custom_metadata_map
    else:
        extra = {EXTRA_FILE: ""}
        module = torch.jit.load(str(path), _extra_files=extra)
        with torch.no_grad():
            got = module(batch).numpy()
        meta = json.loads(extra[EXTRA_FILE])
    assert abs(got - expected).max() <= 1e-4
    assert meta["task"] == "multi_label"
    assert json.loads(meta["thresholds"]) == pytest.approx(result.calibration["thresholds"])
    assert json.loads(meta["temperature"]) == result.calibration["temperature"]


def test_the_default_recipe_trains_a_multi_label_run_and_resumes_it(multilabel_folder,
                                                                    tmp_path):
    from ftune.models.errors import TrainingCancelled
    from ftune.models.training.fit import Callbacks

    spec = {"image_size": 32, "batch_size": 8, "epochs": 3}
    whole = fit(multilabel_folder, spec)
    assert "learning-rate range test" in whole.resolved["optimizer.lr"]["why"]
    assert [r["stage"] for r in whole.history].count("finetune") >= 1
    assert whole.resolved["class_weights"]["value"] in ("balanced", "none")
    head_rows = [r for r in whole.history if r["stage"] == "head"]
    finished: list[dict] = []
    with pytest.raises(TrainingCancelled):
        fit(multilabel_folder, spec, checkpoint_dir=tmp_path,
            callbacks=Callbacks(on_epoch_end=finished.append,
                                should_stop=lambda: len(finished) > len(head_rows)))
    resumed = fit(multilabel_folder, spec, checkpoint_dir=tmp_path, resume=tmp_path)
    assert [r["stage"] for r in resumed.history] == [r["stage"] for r in whole.history]
    for a, b in zip(resumed.history, whole.history, strict=True):
        assert a["val_map"] == pytest.approx(b["val_map"], rel=1e-4, abs=1e-5)
    for key in ("temperature", "thresholds"):
        assert resumed.calibration[key] == pytest.approx(whole.calibration[key], rel=1e-3)
