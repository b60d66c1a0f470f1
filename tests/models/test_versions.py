"""Dataset versions as trees: a delta laid out as its parent is, holding only what is new,
and the parent with the delta over it scanning as the version (every layout)."""

from __future__ import annotations

import shutil

import pytest

from ftune.models.data.discover import scan_image_folder
from ftune.models.data.versions import NewImage, overlay, write_delta
from ftune.models.errors import DatasetError


def _new(folder, names_labels):
    return [NewImage(folder / name, name, labels) for name, labels in names_labels]


@pytest.fixture
def extra(tmp_path, animal_arrays):
    """Three new real images, and a copy of one of the parent's."""
    from PIL import Image

    images, _ = animal_arrays
    folder = tmp_path / "extra"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(images[8000 + i]).save(folder / f"n{i}.png")
    return folder


def test_class_folders_get_new_images_in_their_class_and_copies_are_left_out(
        tmp_path, tiny_folder, extra):
    shutil.copy(next((tiny_folder / "animal1").iterdir()), extra / "copy.png")
    delta = write_delta(tiny_folder, _new(extra, [("n0.png", ("animal0",)),
                                                  ("n1.png", ("animal2",)),
                                                  ("copy.png", ("animal1",))]),
                        tmp_path / "delta", "v2")
    assert delta.duplicates == ["copy.png"] and delta.by_class == {"animal0": 1, "animal2": 1}
    assert sorted(p.split("/")[0] for p in delta.added) == ["animal0", "animal2"]
    version = tmp_path / "version"
    overlay([tiny_folder, tmp_path / "delta"], version)
    parent, merged = scan_image_folder(tiny_folder), scan_image_folder(version)
    assert len(merged.train) + len(merged.val or []) == \
        len(parent.train) + len(parent.val or []) + 2
    assert merged.classes == parent.classes


def test_a_manifest_gets_rows_for_its_new_images(tmp_path, multilabel_folder, extra):
    delta = write_delta(multilabel_folder, _new(extra, [("n0.png", ("animal0", "digit2")),
                                                        ("n1.png", ())]),
                        tmp_path / "delta", "v2")
    assert len(delta.added) == 2 and all(p.startswith("added/v2/") for p in delta.added)
    version = tmp_path / "version"
    overlay([multilabel_folder, tmp_path / "delta"], version)
    merged = scan_image_folder(version)
    assert merged.multi_label and len(merged.train) == len(
        scan_image_folder(multilabel_folder).train) + 2
    row = next(line for line in (version / "labels.csv").read_text().splitlines()
               if "n0.png" in line)
    assert "animal0;digit2" in row and row.endswith(",train")
    assert "n0.png" not in (multilabel_folder / "labels.csv").read_text()  # parent untouched


def test_labels_a_layout_cannot_hold_are_refused(tmp_path, tiny_folder, extra):
    for labels in (("animal0", "animal1"), ("../x",), ("",)):
        with pytest.raises(DatasetError):
            write_delta(tiny_folder, _new(extra, [("n0.png", labels)]), tmp_path / "d", "v2")
