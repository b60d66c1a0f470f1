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
