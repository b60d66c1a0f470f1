"""The store of things derived from datasets, and decoded images kept in it."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from ftune.models.backbones import create_backbone
from ftune.models.data.discover import scan_image_folder
from ftune.models.data.source import ImageSource
from ftune.models.derived.decoded import KIND, decoded_images
from ftune.models.derived.features import KIND as FEATURES_KIND
from ftune.models.derived.features import shared_features
from ftune.models.derived.store import DerivedStore
from ftune.models.training.fit import Callbacks, fit


def _writer(size: int, calls: list | None = None):
    def make(folder) -> None:
        if calls is not None:
            calls.append(1)
            time.sleep(0.2)  # long enough for a second builder to arrive meanwhile
        (folder / "blob").write_bytes(b"x" * size)
    return make


def test_an_entry_is_built_once_and_then_found(tmp_path):
    store = DerivedStore(tmp_path, max_bytes=10_000)
    folder, made = store.build("decoded", "k1", _writer(100), owner="t1")
    assert made and (folder / "blob").read_bytes() == b"x" * 100
    again, made_again = store.build("decoded", "k1", _writer(100), owner="t1")
    assert again == folder and not made_again
    assert store.lookup("decoded", "k2") is None
    assert not list((tmp_path / ".tmp").iterdir())  # nothing half-built left


def test_concurrent_builders_of_one_key_build_it_once(tmp_path):
    store = DerivedStore(tmp_path, max_bytes=10_000)
    calls: list[int] = []
    threads = [threading.Thread(target=store.build, args=("decoded", "k", _writer(10, calls)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(store.entries()) == 1


def test_least_recently_used_entries_go_beyond_the_cap_and_owners_are_accounted(tmp_path):
    store = DerivedStore(tmp_path, max_bytes=2500, min_idle_s=0)
    store.build("decoded", "a", _writer(1000), owner="t1")
    time.sleep(0.02)
    store.build("decoded", "b", _writer(1000), owner="t1")
    time.sleep(0.02)
    assert store.lookup("decoded", "a", owner="t1") is not None  # b is now the oldest
    time.sleep(0.02)
    store.build("decoded", "c", _writer(1000), owner="t1")
    assert sorted(e.key for e in store.entries()) == ["a", "c"]
    assert store.usage_by_owner() == {"t1": 2000}
    assert store.clean(owner="t2") == (0, 0)
    assert store.clean(owner="t1") == (2, 2000)
    assert store.entries() == []


def test_an_owner_over_its_share_of_the_cap_evicts_its_own_entries_first(tmp_path):
    """One tenant filling the store does not push out another's (older) entries."""
    store = DerivedStore(tmp_path, max_bytes=3500, min_idle_s=0)
    store.build("decoded", "quiet", _writer(1000), owner="t2")  # the oldest entry
    for key in ("a", "b", "c"):
        time.sleep(0.02)
        store.build("decoded", key, _writer(1000), owner="t1")
    # 4000 bytes over a 3500 cap: t1 holds 3000, over its 1750 share; its oldest goes.
    assert sorted((e.owner, e.key) for e in store.entries()) == [
        ("t1", "b"), ("t1", "c"), ("t2", "quiet")]
    assert store.usage_by_owner() == {"t1": 2000, "t2": 1000}


def test_each_owner_has_its_own_entries_of_one_key(tmp_path):
    """Another tenant's entry of the same content is never found: finding it would tell
    this tenant that the other had the same data."""
    store = DerivedStore(tmp_path, max_bytes=10_000, shared=False)
    first, made = store.build("decoded", "k", _writer(10), owner="t1")
    assert made and store.lookup("decoded", "k", owner="t2") is None
    other, made_again = store.build("decoded", "k", _writer(10), owner="t2")
    assert made_again and other != first
    assert store.build("decoded", "k", _writer(10), owner="t1") == (first, False)
    assert "t1" not in first.name and "t2" not in other.name  # a hash, not the tenant's id
    assert {(e.key, e.owner) for e in store.entries()} == {("k", "t1"), ("k", "t2")}
    assert store.lookup("decoded", "k") is None  # nor is an owner's entry found without one


def test_the_operator_setting_shares_entries_across_owners(tmp_path, engine_config,
                                                           monkeypatch):
    monkeypatch.setenv("FTUNE_SHARE_DERIVED_ACROSS_TENANTS", "true")
    engine_config()  # what a process reads from its environment at start
    store = DerivedStore(tmp_path, max_bytes=10_000)
    assert store.shared
    first, made = store.build("decoded", "k", _writer(10), owner="t1")
    assert made and store.lookup("decoded", "k", owner="t2") == first
    assert store.build("decoded", "k", _writer(10), owner="t2") == (first, False)
    assert store.usage_by_owner() == {"t1": 10}  # accounted to the tenant that made it
    monkeypatch.delenv("FTUNE_SHARE_DERIVED_ACROSS_TENANTS")
    engine_config()
    assert not DerivedStore(tmp_path, max_bytes=10_000).shared  # off by default


def test_an_entry_just_looked_up_is_not_evicted_under_its_reader(tmp_path):
    """Another job may have looked it up and not opened its files yet."""
    store = DerivedStore(tmp_path, max_bytes=1500)  # the default minute of grace
    store.build("decoded", "a", _writer(1000))
    store.build("decoded", "b", _writer(1000))  # over the cap, but a was used just now
    assert sorted(e.key for e in store.entries()) == ["a", "b"]
    old = time.time() - 120
    os.utime(store.lookup("decoded", "a") / "meta.json", (old, old))  # idle for 2 minutes
    store.evict()
    assert [e.key for e in store.entries()] == ["b"]


@pytest.mark.parametrize("name", ["../x", ".hidden", "a/b", "", "UPPER", "k.tag"])
def test_names_cannot_leave_the_store(tmp_path, name):
    with pytest.raises(ValueError):
        DerivedStore(tmp_path, 100).build("decoded", name, _writer(1))


def test_decoded_images_match_decoding_in_memory(tmp_path, tiny_folder):
    index = scan_image_folder(tiny_folder)
    prep = create_backbone("tf_efficientnet_lite0", pretrained=False, image_size=32).preprocessing
    paths = [s.path for s in index.train]
    decoded, made = decoded_images(DerivedStore(tmp_path, 10**9), index.content_hash, paths,
                                   index.root, prep, 32)
    assert made
    labels = [s.label for s in index.train]
    stored = ImageSource(paths, labels, prep, 32, decoded=decoded, root=index.root)
    fresh = ImageSource(paths, labels, prep, 32)
    assert stored.predecoded and not fresh.predecoded
    order = torch.randperm(len(paths))
    for (a, la, _), (b, lb, _) in zip(stored.batches(order, 8), fresh.batches(order, 8),
                                      strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_features_of_a_range_of_rows_are_those_rows_of_the_whole(tmp_path, tiny_folder):
    index = scan_image_folder(tiny_folder)
    prep = create_backbone("tf_efficientnet_lite0", pretrained=False, image_size=32).preprocessing
    store = DerivedStore(tmp_path, 10**9)
    decoded, _ = decoded_images(store, index.content_hash, [s.path for s in index.train],
                                index.root, prep, 32)
    n = len(decoded.array)

    def extract(images: torch.Tensor) -> torch.Tensor:  # any function of each image will do
        return images.float().mean(dim=(2, 3))

    def features(rows: range):
        return shared_features(store, decoded, rows, backbone="b", precision="fp32",
                               extract=extract, batch_size=5)

    (whole, _), (tail, made) = features(range(n)), features(range(7, n))
    assert made and len(tail.array) == n - 7
    rows = torch.tensor([n - 1, 7, 12])
    assert tail.covers(rows) and not tail.covers(torch.tensor([6, 7]))
    assert torch.equal(tail.take(rows), whole.take(rows))
    assert torch.equal(whole.take(rows), extract(decoded.take(rows)))
    assert features(range(7, n))[1] is False  # an entry per range, found again


def test_a_second_job_on_the_same_data_decodes_nothing(tmp_path, tiny_folder, caplog):
    """Nor computes frozen features: both come from the store, and the result is the same.
    A job of another owner (tenant) on the same data finds nothing of the first's: it
    decodes and computes its own, exactly like a first job."""
    store = DerivedStore(tmp_path / "cache", 10**9, shared=False)
    spec = {"preset": "fast", "image_size": 32, "epochs": 2}
    choices: list[dict] = [{}, {}, {}]
    results = []
    with caplog.at_level("INFO", logger="ftune.models.training.fit"):
        for owner, chosen in zip(("t1", "t2", "t1"), choices, strict=True):
            results.append(fit(tiny_folder, spec, derived=store, owner=owner,
                               callbacks=Callbacks(on_resolved=chosen.update)))
    messages = [r.getMessage() for r in caplog.records if "images at 32 px" in r.getMessage()]
    assert [m.split(" 36 images")[0] for m in messages] == ["decoded", "decoded",
                                                            "reused the decoded"]
    assert [c["feature_cache"]["value"] for c in choices] == ["computed", "computed", "reused"]
    assert sorted((e.kind, e.owner) for e in store.entries()) == [
        (KIND, "t1"), (KIND, "t2"), (FEATURES_KIND, "t1"), (FEATURES_KIND, "t2")]
    first, other, second = ([r["val_loss"] for r in result.history] for result in results)
    assert first == second == other
    plain = fit(tiny_folder, spec)
    assert [r["val_loss"] for r in plain.history] == pytest.approx(first, rel=1e-5)


def test_builds_in_progress_and_entries_being_removed_are_not_entries(tmp_path):
    store = DerivedStore(tmp_path, max_bytes=10_000)
    store.build("decoded", "real", _writer(10), owner="t1")
    for hidden in (".tmp/abc", ".tmp/gone-def"):
        folder = tmp_path / hidden
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text('{"kind": "decoded", "key": "x", "bytes": 5}')
    assert [e.key for e in store.entries()] == ["real"]


def test_test_images_are_scored_from_the_shared_features_exactly_as_from_the_images(
        tmp_path, animal_arrays):
    """A head trained alone is evaluated on test from the features the job already computed
    for every image: the same evaluation as running the backbone on the test images."""
    from ftune.testing.realdata import balanced_indices, write_image_folder

    images, labels = animal_arrays
    root = tmp_path / "data"
    for split, offset in (("train", 0), ("test", 12)):
        idx = balanced_indices(labels, 12 if split == "train" else 6, classes=3, offset=offset)
        write_image_folder(root / split, images[idx], labels[idx])
    spec = {"preset": "fast", "image_size": 32, "epochs": 3}
    from_images = fit(root, spec).evaluation["test"]
    store = DerivedStore(tmp_path / "cache", 10**9)
    from_features = fit(root, spec, derived=store).evaluation["test"]
    # Training computed the training images' features; evaluating the head, the test ones'.
    assert sorted(e.key.rsplit("-", 1)[1] for e in store.entries()
                  if e.kind == FEATURES_KIND) == ["rows0to36", "rows36to54"]
    assert from_features["accuracy"] == from_images["accuracy"]
    assert from_features["confusion_matrix"] == from_images["confusion_matrix"]
    assert from_features["loss"] == pytest.approx(from_images["loss"], rel=1e-5)
