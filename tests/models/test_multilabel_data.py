"""Multi-label datasets: labels.csv forms, detection, the report's figures and findings, and
the iterative stratified split, on small folders of real image files."""

from __future__ import annotations

import random
import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ftune.models.data.discover import inspect_dataset, scan_image_folder
from ftune.models.data.split import iterative_split
from ftune.models.errors import DatasetError


def _image(path, seed: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _codes(report) -> dict[str, dict]:
    d = report.to_dict()
    return {f["code"]: f for f in d["errors"] + d["warnings"] + d["info"]}


def _images(root, n: int) -> None:
    for i in range(n):
        _image(root / "img" / f"{i}.png", seed=i)


@pytest.mark.parametrize("csv", [
    # separators in one column, either character
    "path,labels\nimg/0.png,red;shoe\nimg/1.png,red | bag\nimg/2.png,shoe\nimg/3.png,\n",
    # a 'label' column with several rows for one path
    "path,label\nimg/0.png,red\nimg/0.png,shoe\nimg/1.png,bag\nimg/1.png,red\n"
    "img/2.png,shoe\nimg/3.png,\n",
])
def test_the_csv_forms_give_the_same_label_sets(tmp_path, csv):
    _images(tmp_path, 4)
    (tmp_path / "labels.csv").write_text(csv)
    inspection = inspect_dataset(tmp_path, min_per_class=1)
    index, report = inspection.index, inspection.report
    assert index.task == "multi_label" and report.task == "multi_label"
    assert index.classes == ["bag", "red", "shoe"]
    targets = {s.path.name: s.targets for s in index.train}
    assert targets == {"0.png": (1, 2), "1.png": (0, 1), "2.png": (2,), "3.png": ()}
    d = report.to_dict()
    assert d["task"] == "multi_label" and d["splits"]["train"]["images"] == 4
    assert d["splits"]["train"]["per_class"] == {"bag": 1, "red": 2, "shoe": 2}
    assert d["label_sets"]["cardinality"] == 1.25
    assert d["label_sets"]["labels_per_image"] == {"0": 1, "1": 1, "2": 2}
    assert {"labels": ["red", "shoe"], "images": 1} in d["label_sets"]["co_occurrence"]
    assert _codes(report)["images_without_labels"]["items"] == ["img/3.png"]


def test_one_label_per_row_stays_single_label_and_an_empty_label_is_a_bad_row(tmp_path):
    _images(tmp_path, 4)
    (tmp_path / "labels.csv").write_text(
        "path,label\nimg/0.png,cat\nimg/1.png,cat\nimg/2.png,dog\nimg/3.png,\n")
    inspection = inspect_dataset(tmp_path, min_per_class=1)
    assert inspection.index.task == "single_label"
    assert all(s.targets is None for s in inspection.index.train)
    rows = _codes(inspection.report)["manifest_rows"]
    assert rows["items"] == [{"row": "labels.csv line 5", "reason": "empty label"}]


def test_a_labels_column_is_multi_label_even_with_one_label_each(tmp_path):
    _images(tmp_path, 2)
    (tmp_path / "labels.csv").write_text("path,labels\nimg/0.png,cat\nimg/1.png,dog\n")
    assert inspect_dataset(tmp_path, min_per_class=1).index.task == "multi_label"


def test_both_label_columns_are_refused(tmp_path):
    _images(tmp_path, 2)
    (tmp_path / "labels.csv").write_text("path,label,labels\nimg/0.png,cat,dog\n")
    with pytest.raises(DatasetError, match="both a 'label' and a 'labels' column"):
        scan_image_folder(tmp_path)


def test_positives_negatives_and_unknown_labels_are_reported(tmp_path):
    _images(tmp_path, 8)
    rows = [f"img/{i}.png,common;{'rare' if i == 0 else 'mid' if i < 4 else ''},train"
            for i in range(6)]
    rows += ["img/6.png,mid;ghost,val", "img/7.png,common,test"]
    (tmp_path / "labels.csv").write_text("path,labels,split\n" + "\n".join(rows) + "\n")
    report = inspect_dataset(tmp_path, min_per_class=2).report
    codes = _codes(report)
    assert codes["too_few_positives"]["items"] == [{"class": "rare", "positives": 1}]
    assert codes["too_few_negatives"]["items"] == [{"class": "common", "negatives": 0}]
    assert codes["classes_missing_from_train"]["items"] == ["val/ghost"]
    assert not report.ok
    with pytest.raises(DatasetError, match="fewer than 2 usable training images"):
        scan_image_folder(tmp_path, min_per_class=2)


def test_duplicates_and_identity_compare_label_sets(tmp_path):
    _images(tmp_path, 3)
    shutil.copy(tmp_path / "img" / "0.png", tmp_path / "img" / "copy.png")
    csv = "path,labels\nimg/0.png,a;b\nimg/copy.png,b;a\nimg/1.png,a\nimg/2.png,b\n"
    (tmp_path / "labels.csv").write_text(csv)
    first = inspect_dataset(tmp_path, min_per_class=1)
    assert _codes(first.report)["duplicates"]["items"] == [["img/0.png", "img/copy.png"]]
    (tmp_path / "labels.csv").write_text(csv.replace("b;a", "b"))
    second = inspect_dataset(tmp_path, min_per_class=1)
    assert "conflicting_labels" in _codes(second.report)
    assert first.index.content_hash != second.index.content_hash


def _label_sets(n: int, classes: int, seed: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    weights = [1 / (c + 1) ** 1.5 for c in range(classes)]  # a long tail of rare classes
    return [tuple(sorted(c for c in range(classes) if rng.random() < weights[c]))
            for _ in range(n)]


def test_iterative_split_spreads_every_class_and_is_seeded():
    sets = _label_sets(600, 12, seed=3)
    train, val = iterative_split(sets, 0.2, seed=7)
    assert sorted(train + val) == list(range(600))
    assert iterative_split(sets, 0.2, seed=7) == (train, val)
    assert abs(len(val) - 120) <= 3
    total = Counter(c for s in sets for c in s)
    in_val = Counter(c for i in val for c in sets[i])
    for cls, n in total.items():
        assert abs(in_val[cls] - 0.2 * n) <= 1.5, (cls, n, in_val[cls])


def test_iterative_split_keeps_a_lone_positive_in_train():
    sets = [(0,), (1,), (1,), (1,), (), ()]
    for seed in range(20):
        train, _ = iterative_split(sets, 0.5, seed)
        assert 0 in train and any(sets[i] == (1,) for i in train)
