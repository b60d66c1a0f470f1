"""The ranking of images to label: least sure first, never two near-duplicates, spread out."""

from __future__ import annotations

import pytest
import torch

from ftune.models.suggestions import pick_for_labelling, uncertainty


def test_uncertainty_of_calibrated_scores():
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.7, 0.2, 0.1]])
    assert uncertainty(probs).tolist() == pytest.approx([1.0, 0.0, 0.5])
    entropy = uncertainty(torch.tensor([[1 / 3] * 3, [1.0, 0.0, 0.0]]), measure="entropy")
    assert entropy.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    # Multi-label: each class against its own threshold, averaged over the classes.
    thresholds = torch.tensor([0.5, 0.2])
    multi = uncertainty(torch.tensor([[0.5, 0.2], [1.0, 0.0], [0.75, 0.6]]),
                        thresholds=thresholds)
    assert multi.tolist() == pytest.approx([1.0, 0.0, (0.5 + 0.5) / 2])


def test_the_least_sure_comes_first_and_a_near_duplicate_is_never_picked_with_it():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.001], [0.0, 1.0], [0.7, 0.7]])
    scores = torch.tensor([0.9, 0.95, 0.5, 0.4])  # 0 and 1: the same picture, twice
    picks = pick_for_labelling(scores, features, 3)
    assert [p.index for p in picks] == [1, 2, 3]
    assert picks[0].distance == 1.0 and picks[0].score == pytest.approx(0.95)
    assert all(p.distance > 0.02 for p in picks)


def test_spread_beats_a_slightly_surer_cluster():
    # Three near-identical hard images (not duplicates) and one different, a bit surer.
    features = torch.tensor([[1.0, 0.0], [1.0, 0.25], [1.0, -0.25], [0.0, 1.0]])
    scores = torch.tensor([0.9, 0.89, 0.88, 0.8])
    assert [p.index for p in pick_for_labelling(scores, features, 2)] == [0, 3]


def test_fewer_picks_when_only_duplicates_are_left():
    features = torch.ones(5, 4)
    picks = pick_for_labelling(torch.rand(5), features, 3)
    assert len(picks) == 1
    assert pick_for_labelling(torch.rand(0), torch.ones(0, 4), 3) == []


def test_a_tuned_model_ranks_a_folder_of_unlabelled_images(tmp_path, tiny_folder):
    """The whole run on real images: scores and features from one pass, kept in the derived
    store so that asking again costs no forward pass."""
    import shutil

    from ftune.models.bundle import save_bundle
    from ftune.models.derived.store import DerivedStore
    from ftune.models.spec import parse_spec
    from ftune.models.suggestion_run import SCORES_KIND, suggest
    from ftune.models.training.fit import fit

    result = fit(tiny_folder, parse_spec({"image_size": 32, "epochs": 1, "preset": "fast"}),
                 device="cpu")
    bundle = save_bundle(result, tmp_path / "model")
    pool = tmp_path / "pool"
    for i, image in enumerate(sorted(tiny_folder.rglob("*.png"))[::2]):
        (pool / f"batch{i % 3}").mkdir(parents=True, exist_ok=True)
        shutil.copy(image, pool / f"batch{i % 3}" / f"{i:03d}.png")
    derived = DerivedStore(tmp_path / "derived", 1 << 30)
    progress: list[tuple[int, int]] = []
    picks = suggest(bundle, pool, 5, derived=derived, model_id="m1",
                    on_progress=lambda done, total: progress.append((done, total)))
    assert len(picks) == 5 and len({p["path"] for p in picks}) == 5
    assert all((pool / p["path"]).is_file() for p in picks)
    assert [p["score"] for p in picks[:1]] == [picks[0]["uncertainty"]]  # first: most unsure
    assert all(0 <= p["uncertainty"] <= 1 and 0 < p["distance"] <= 1 for p in picks)
    assert all(len(p["guess"]) == 3 and p["guess"][0]["label"] in result.classes
               for p in picks)
    assert progress and progress[-1] == (18, 18)
    progress.clear()
    assert suggest(bundle, pool, 5, derived=derived, model_id="m1",
                   on_progress=lambda done, total: progress.append((done, total))) == picks
    assert progress == []  # scored before: no forward pass
    assert any(entry.kind == SCORES_KIND for entry in derived.entries())
