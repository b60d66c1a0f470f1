"""The evaluation's numbers, checked by hand on a small case and against training's own."""

from __future__ import annotations

import json

import pytest
import torch

from ftune.models.evaluation import summarize


def test_summary_numbers_by_hand():
    classes = ["cat", "dog", "fox"]
    # true:      cat  cat  dog  dog  fox  fox
    # predicted: cat  dog  dog  dog  cat  fox
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1],
                          [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.1, 0.1, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    names = [f"{i}.png" for i in range(6)]
    result = summarize(probs, labels, classes, names)
    assert result["num_images"] == 6 and result["accuracy"] == pytest.approx(4 / 6)
    assert result["top_k"] == 3 and result["top_k_accuracy"] == 1.0
    assert result["confusion_matrix"]["rows_true_columns_predicted"] == [[1, 1, 0], [0, 2, 0],
                                                                         [1, 0, 1]]
    cat, dog, fox = result["per_class"]
    assert cat == {"class": "cat", "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert dog["precision"] == pytest.approx(2 / 3) and dog["recall"] == 1.0
    assert dog["f1"] == pytest.approx(0.8)
    assert fox["precision"] == 1.0 and fox["recall"] == 0.5
    assert result["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert {(p["true"], p["predicted"]) for p in result["most_confused"]} == {("cat", "dog"),
                                                                             ("fox", "cat")}
    worst, second = result["highest_loss"][:2]
    assert (worst["path"], worst["true"], worst["predicted"]) == ("1.png", "cat", "dog")
    assert worst["loss"] == pytest.approx(-torch.log(torch.tensor(0.3)).item(), rel=1e-5)
    assert second["path"] == "4.png" and second["confidence"] == pytest.approx(0.5)
    # ECE by hand: bins (0.6,0.667]: conf .6 wrong; (0.667,0.733]: .7 right; (0.8,0.867]: .8, .8
    # right; (0.867,0.933]: .9 right; (0.467,0.533]: .5 wrong.
    expected = (abs(0 - 0.6) + abs(1 - 0.7) + 2 * abs(1 - 0.8) + abs(1 - 0.9)
                + abs(0 - 0.5)) / 6
    assert result["expected_calibration_error"] == pytest.approx(expected, abs=1e-6)


def test_trained_bundle_carries_an_evaluation_matching_training(animal_folder, tmp_path):
    from ftune.models.bundle import save_bundle
    from ftune.models.training.fit import fit

    result = fit(animal_folder, {"image_size": 48, "epochs": 2, "batch_size": 32,
                                 "optimizer": {"name": "adam", "lr": 0.003}})
    val = result.evaluation["val"]
    assert val["num_images"] == result.num_val == 80
    # The best weights evaluated again give the best epoch's own validation accuracy.
    assert val["accuracy"] == pytest.approx(result.best_metrics["val_accuracy"], abs=1e-6)
    assert len(val["confusion_matrix"]["rows_true_columns_predicted"]) == 10
    assert sum(map(sum, val["confusion_matrix"]["rows_true_columns_predicted"])) == 80
    assert val["highest_loss"][0]["path"].startswith("animal")
    out = save_bundle(result, tmp_path / "m")
    assert json.loads((out / "evaluation.json").read_text())["val"]["accuracy"] == val["accuracy"]


def test_a_class_never_predicted_counts_as_zero_f1():
    probs = torch.tensor([[0.9, 0.1]] * 4)
    result = summarize(probs, torch.tensor([0, 0, 1, 1]), ["a", "b"], ["0", "1", "2", "3"])
    assert result["per_class"][1]["precision"] is None and result["per_class"][1]["f1"] == 0.0
    assert result["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_a_test_split_is_evaluated_too(tiny_folder, tmp_path):
    import shutil

    from ftune.models.training.fit import fit

    for path in sorted(tiny_folder.rglob("*.png")):
        split = ("test" if int(path.stem) % 4 == 0 else
                 "val" if int(path.stem) % 4 == 1 else "train")
        target = tmp_path / "data" / split / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    result = fit(tmp_path / "data", {"image_size": 32, "epochs": 1})
    assert set(result.evaluation) == {"val", "test"}
    test = result.evaluation["test"]
    assert test["num_images"] == 9 and sum(row["support"] for row in test["per_class"]) == 9
    assert all(item["path"].startswith("test/") for item in test["highest_loss"])
