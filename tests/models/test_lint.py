"""Layouts, the lint report and dataset identity, on small folders of real image files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from ftune.models.data.discover import inspect_dataset, scan_image_folder
from ftune.models.errors import DatasetError


def _image(path, seed: int = 0, size=(40, 40), fmt: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _codes(report) -> dict[str, dict]:
    d = report.to_dict()
    return {f["code"]: f for f in d["errors"] + d["warnings"] + d["info"]}


def test_every_supported_format_is_read(tmp_path):
    for i, suffix in enumerate(["jpg", "png", "bmp", "gif", "webp", "tiff"]):
        _image(tmp_path / "a" / f"{i}.{suffix}", seed=i)
        _image(tmp_path / "b" / f"{i}.{suffix.upper()}", seed=10 + i)
    index = scan_image_folder(tmp_path)
    assert len(index.train) == 12 and index.skipped == []


def test_csv_manifest_with_splits_and_bad_rows(tmp_path):
    for i in range(4):
        _image(tmp_path / "img" / f"{i}.png", seed=i)
    _image(tmp_path / "unlisted.png", seed=9)
    (tmp_path / "labels.csv").write_text(
        "path,label,split\n"
        "img/0.png,cat,train\nimg/1.png,cat,train\nimg/2.png,dog,train\nimg/3.png, dog ,train\n"
        "img/0.png,cat,val\n"
        "../outside.png,cat,train\n/etc/passwd,dog,train\nimg/9.png,dog,train\n"
        "img/1.png,dog,holdout\n")
    inspection = inspect_dataset(tmp_path)
    index, report = inspection.index, inspection.report
    assert report.layout == "csv_manifest" and index.classes == ["cat", "dog"]
    assert len(index.train) == 4 and len(index.val) == 1
    codes = _codes(report)
    reasons = " ".join(item["reason"] for item in codes["manifest_rows"]["items"])
    assert codes["manifest_rows"]["count"] == 4
    assert "outside the dataset" in reasons and "does not exist" in reasons
    assert "'holdout' is not train, val or test" in reasons
    assert codes["leakage"]["items"] == [["img/0.png", "img/0.png"]]
    assert report.ignored == {"not listed in labels.csv": 1}


def test_csv_manifest_without_the_right_header_is_an_error(tmp_path):
    _image(tmp_path / "0.png")
    (tmp_path / "labels.csv").write_text("file,class\n0.png,cat\n")
    report = inspect_dataset(tmp_path).report
    assert "manifest_invalid" in _codes(report) and not report.ok
    with pytest.raises(DatasetError, match="'path' and 'label'"):
        scan_image_folder(tmp_path)


def test_minimum_images_per_class_is_configurable(tmp_path):
    for cls in ("a", "b"):
        for i in range(3):
            _image(tmp_path / cls / f"{i}.png", seed=hash(cls) % 100 + i)
    assert inspect_dataset(tmp_path, min_per_class=3).report.ok
    report = inspect_dataset(tmp_path, min_per_class=4).report
    assert _codes(report)["too_few_images"]["count"] == 2


def test_nothing_decodable_is_an_error(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "x.png").write_bytes(b"not an image")
    codes = _codes(inspect_dataset(tmp_path).report)
    assert {"nothing_decodable", "too_few_images", "corrupt_files"} <= set(codes)


def test_duplicates_conflicts_similar_names_sizes(tmp_path):
    _image(tmp_path / "cat" / "0.png", seed=1)
    _image(tmp_path / "cat" / "1.png", seed=2)
    shutil.copy(tmp_path / "cat" / "0.png", tmp_path / "cat" / "copy.png")
    _image(tmp_path / "Cat " / "0.png", seed=2)  # the same bytes as cat/1.png
    _image(tmp_path / "Cat " / "1.png", seed=5)
    _image(tmp_path / "dog" / "tiny.png", seed=3, size=(16, 16))
    _image(tmp_path / "dog" / "wide.png", seed=4, size=(300, 40))
    codes = _codes(inspect_dataset(tmp_path).report)
    assert codes["duplicates"]["items"] == [["cat/0.png", "cat/copy.png"]]
    assert codes["conflicting_labels"]["count"] == 1
    assert codes["similar_class_names"]["items"] == [["Cat ", "cat"]]
    assert codes["small_images"]["items"] == [{"path": "dog/tiny.png", "size": [16, 16]}]
    assert codes["extreme_aspect_ratio"]["items"][0]["path"] == "dog/wide.png"


def test_imbalance_ratio_and_warning(tmp_path):
    for i in range(20):
        _image(tmp_path / "many" / f"{i}.png", seed=i)
    for i in range(2):
        _image(tmp_path / "few" / f"{i}.png", seed=100 + i)
    report = inspect_dataset(tmp_path).report
    assert report.imbalance_ratio == 10.0 and "imbalance" in _codes(report)
    assert report.ok  # warnings never block


def test_pixel_limit_is_checked_before_decoding(tmp_path, engine_config):
    _image(tmp_path / "a" / "0.png", seed=1)
    _image(tmp_path / "a" / "1.png", seed=2)
    (tmp_path / "b").mkdir()
    Image.new("1", (12000, 12000)).save(tmp_path / "b" / "huge.png")  # tiny file, 144 Mpx
    _image(tmp_path / "b" / "1.png", seed=3)
    _image(tmp_path / "b" / "2.png", seed=4)
    engine_config(max_image_pixels=10_000_000)
    index = scan_image_folder(tmp_path)
    reason = dict(index.skipped)["b/huge.png"]
    # From our header check, or from PIL's (an error once configured), whichever comes first:
    # either way naming our limit.
    assert reason.startswith("too many pixels (") and "10000000" in reason


def test_content_hash_ignores_order_and_names_but_not_labels(tmp_path):
    for i in range(3):
        _image(tmp_path / "one" / "a" / f"{i}.png", seed=i)
        _image(tmp_path / "one" / "b" / f"{i}.png", seed=10 + i)
    shutil.copytree(tmp_path / "one", tmp_path / "two" / "top")
    for path in (tmp_path / "two" / "top" / "a").iterdir():
        path.rename(path.with_name("renamed-" + path.name))
    first = scan_image_folder(tmp_path / "one").content_hash
    assert first and scan_image_folder(tmp_path / "two").content_hash == first
    shutil.move(tmp_path / "two" / "top" / "a" / "renamed-0.png", tmp_path / "two" / "top" / "b")
    assert scan_image_folder(tmp_path / "two").content_hash != first


def test_a_lone_folder_of_images_is_one_class_not_a_wrapper(tmp_path, capsys):
    from ftune.models.cli import main

    for i in range(3):
        _image(tmp_path / "data" / "cats" / f"{i}.png", seed=i)
    report = inspect_dataset(tmp_path / "data").report
    assert report.classes == ["cats"]
    too_few = _codes(report)["too_few_classes"]
    assert too_few["message"].startswith("found one class (cats)")
    assert "at least one more class" in too_few["action"]
    # Under a wrapper folder it is the same class.
    for i in range(3):
        _image(tmp_path / "wrapped" / "top" / "cats" / f"{i}.png", seed=i)
    assert inspect_dataset(tmp_path / "wrapped").report.classes == ["cats"]
    assert main(["lint", str(tmp_path / "data")]) == 2
    out = capsys.readouterr().out
    assert "None" not in out and "found one class (cats)" in out
