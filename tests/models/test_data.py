import numpy as np
import pytest
import torch
from PIL import Image

from ftune.models.data.discover import inspect_dataset, scan_image_folder
from ftune.models.data.images import open_rgb
from ftune.models.data.split import stratified_split
from ftune.models.errors import DatasetError


def _image(path, mode="RGB", size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], 40000, dtype=np.uint16)).save(path)
    else:
        Image.new(mode, size).save(path)
    return path


def _finding(report, code: str) -> dict:
    found = [f for f in report.to_dict()["errors"] + report.to_dict()["warnings"]
             + report.to_dict()["info"] if f["code"] == code]
    assert found, f"no {code} in {[f.code for f in report.findings]}"
    assert found[0]["action"], "every finding says what to do"
    return found[0]


def test_class_folders_hidden_files_and_junk(tmp_path):
    root = tmp_path / "data"
    for cls in ("cat", "dog"):
        for i in range(3):
            _image(root / cls / f"{i}.png")
    _image(root / "cat" / "nested" / "deep.png")
    (root / ".DS_Store").write_bytes(b"junk")
    _image(root / ".ipynb_checkpoints" / "x" / "0.png")
    _image(root / "dog" / ".hidden.png")
    (root / "dog" / "notes.txt").write_text("hello")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "Thumbs.db").write_bytes(b"junk")
    _image(root / "__MACOSX" / "cat" / "._0.png")
    index = scan_image_folder(root)
    assert index.classes == ["cat", "dog"]
    assert len(index.train) == 7 and index.val is None
    skipped = dict(index.skipped)
    assert list(skipped) == ["dog/broken.jpg"] and skipped["dog/broken.jpg"].startswith("cannot")
    report = inspect_dataset(root).report
    assert report.ignored == {"hidden": 5, "not an image": 1}
    ignored = {i["path"]: i["reason"] for i in _finding(report, "ignored_files")["items"]}
    assert ignored["dog/notes.txt"] == "not an image"
    assert ignored[".ipynb_checkpoints/x/0.png"] == ignored["__MACOSX/cat/._0.png"] == "hidden"
    assert _finding(report, "corrupt_files")["items"][0]["path"] == "dog/broken.jpg"


def test_train_val_layout_under_one_top_folder(tmp_path):
    root = tmp_path / "export" / "dataset"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            for i in range(2):
                _image(root / split / cls / f"{i}.png")
    index = scan_image_folder(tmp_path / "export")
    assert index.classes == ["a", "b"]
    assert len(index.train) == 4 and len(index.val) == 4
    assert {s.label for s in index.val} == {0, 1}


def test_val_class_missing_from_train_is_a_warning_and_left_out(tmp_path):
    for split, classes in (("train", ("a", "b")), ("val", ("a", "c")), ("test", ("b",))):
        for cls in classes:
            for i in range(2):
                _image(tmp_path / split / cls / f"{i}.png")
    inspection = inspect_dataset(tmp_path)
    index, report = inspection.index, inspection.report
    assert index.classes == ["a", "b"] and len(index.val) == 2 and len(index.test) == 2
    assert report.ok
    assert _finding(report, "classes_missing_from_train")["items"] == ["val/c"]
    assert _finding(report, "val_missing_classes")["items"] == ["b"]
    assert _finding(report, "test_missing_classes")["items"] == ["a"]


@pytest.mark.parametrize("classes", [[], ["only"]])
def test_fewer_than_two_classes(tmp_path, classes):
    tmp_path.joinpath("x.txt").write_text("nothing")
    for cls in classes:
        _image(tmp_path / cls / "0.png")
    with pytest.raises(DatasetError, match="at least 2 classes") as refused:
        scan_image_folder(tmp_path)
    assert ("found one class (only)" if classes else "found no classes") in str(refused.value)


def test_class_left_empty_by_unreadable_images(tmp_path):
    _image(tmp_path / "good" / "0.png")
    _image(tmp_path / "good" / "1.png")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetError, match=r"1 class\(es\) have fewer than 2 usable"):
        scan_image_folder(tmp_path)
    report = inspect_dataset(tmp_path).report
    assert _finding(report, "too_few_images")["items"] == [{"class": "bad", "images": 0}]
    assert _finding(report, "corrupt_files")["items"][0]["path"] == "bad/0.png"


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16", "CMYK"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    path = _image(tmp_path / f"img.{'jpg' if mode == 'CMYK' else 'png'}", mode)
    image = open_rgb(path)
    assert image.mode == "RGB" and image.size == (12, 10)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    image = open_rgb(_image(tmp_path / "deep.png", "I;16"))
    assert image.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (20, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert open_rgb(tmp_path / "r.jpg").size == (10, 20)


def test_stratified_split_is_seeded_and_keeps_every_class():
    labels = [0] * 50 + [1] * 10 + [2] * 2 + [3]
    train, val = stratified_split(labels, 0.2, seed=7)
    assert sorted(train + val) == list(range(len(labels)))
    val_labels = [labels[i] for i in val]
    assert val_labels.count(0) == 10 and val_labels.count(1) == 2 and val_labels.count(2) == 1
    assert 3 not in val_labels  # a lone image stays in train
    assert stratified_split(labels, 0.2, seed=7) == (train, val)
    assert stratified_split(labels, 0.2, seed=8) != (train, val)
    assert stratified_split(labels, 0.0, seed=7) == (list(range(len(labels))), [])


def test_streamed_batches_equal_in_memory_batches(tiny_folder):
    import torch

    from ftune.models.data.source import ImageSource
    from ftune.models.preprocessing import Preprocessing

    index = scan_image_folder(tiny_folder)
    paths, labels = [s.path for s in index.train], [s.label for s in index.train]
    prep = Preprocessing(32, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875)
    in_memory = ImageSource(paths, labels, prep, 32)
    streamed = ImageSource(paths, labels, prep, 32, budget_bytes=0, num_workers=1)
    assert in_memory.in_memory and not streamed.in_memory
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0))
    pairs = zip(in_memory.batches(order, 5), streamed.batches(order, 5), strict=True)
    for (images_a, labels_a, idx_a), (images_b, labels_b, idx_b) in pairs:
        assert images_a.dtype == torch.uint8 and images_a.shape[1:] == (3, 32, 32)
        assert torch.equal(images_a, images_b)
        assert torch.equal(labels_a, labels_b) and torch.equal(idx_a, idx_b)


def test_images_are_checked_before_decoding_and_only_documented_formats_open(tmp_path):
    from ftune.models.data.images import ImageRefused, decode_for, open_checked, open_rgb

    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(bomb)  # 100 Mpx: PIL itself would only warn
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImageRefused, match="too many pixels"):
        open_checked(bomb)
    with pytest.raises(ImageRefused, match=r"too many pixels \(10000×10000 > 1000\)"):
        open_rgb(bomb, max_pixels=1000)
    pcx = tmp_path / "photo.pcx"
    Image.new("RGB", (20, 20)).save(pcx)  # PIL reads PCX; we do not claim to
    with pytest.raises(Exception, match="cannot identify image file"):
        open_checked(pcx)

    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (3200, 2400), (30, 90, 200)).save(photo, quality=90)
    reduced = decode_for(photo, short_side=128)
    assert 256 <= min(reduced.size) < 2400 and reduced.mode == "RGB"  # a reduced DCT scale
    assert decode_for(photo, short_side=2000).size == (3200, 2400)  # no reduction possible


def test_the_centre_of_an_image_stored_for_augmentation_is_the_image_stored_for_eval(tmp_path):
    # Stored larger (to crop from), an image's centre is what evaluation and cached
    # features see: exactly the image stored at the input size.
    from ftune.models.data.transforms import center_crop_batch, resize_center_crop
    from ftune.models.preprocessing import Preprocessing

    prep = Preprocessing(input_size=96, mean=(0.5,) * 3, std=(0.5,) * 3,
                         interpolation="bicubic", crop_pct=0.875)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8))
    stored = resize_center_crop(image, prep, prep.resize_size)[None]
    assert stored.shape[-1] == 109
    expected = resize_center_crop(image, prep, prep.input_size)[None]
    assert torch.equal(center_crop_batch(stored, prep.input_size), expected)
    assert center_crop_batch(expected, 96) is expected
