"""The backbone size table and the memory estimate made from it: right sizes, sensible
growth, and a run that cannot fit is refused before anything is built."""

from __future__ import annotations

import pytest
import timm
import torch

from ftune.models import memory
from ftune.models.backbones.sizes import BACKBONE_SIZES
from ftune.models.errors import ResourceError
from ftune.models.spec import FineTuneSpec
from ftune.models.training.fit import fit


def test_the_size_table_matches_timm():
    # tools/backbone_sizes.py wrote it; a timm upgrade that changes an architecture shows here.
    for name, (params, features, _, _) in BACKBONE_SIZES.items():
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0)
        assert sum(p.numel() for p in model.parameters()) == params, name
        assert model.num_features == features, name


def _estimate(**spec) -> int:
    found = memory.estimate(FineTuneSpec(**spec), num_classes=10, num_images=1000)
    assert found is not None
    return found.total_bytes


def test_the_estimate_grows_with_what_costs_memory():
    base = {"freeze": {"strategy": "none"}, "image_size": 96, "batch_size": 16}
    assert _estimate(**base) < _estimate(**{**base, "batch_size": 64})
    assert _estimate(**base) < _estimate(**{**base, "image_size": 192})
    assert _estimate(**{**base, "freeze": {"strategy": "head_only"}}) < _estimate(**base)
    assert _estimate(**{**base, "optimizer": {"name": "sgd"}}) < _estimate(
        **{**base, "optimizer": {"name": "adam"}})
    assert memory.estimate(FineTuneSpec(backbone="not_measured"), num_classes=2,
                           num_images=10) is None


def test_the_head_alone_on_cached_features_is_estimated_as_such():
    """preset fast (and head_only with augment auto) train no backbone weight: no gradients
    or activations for it, only the cached features."""
    sized = {"image_size": 224, "batch_size": 256}
    fast = memory.estimate(FineTuneSpec(preset="fast", **sized), num_classes=10,
                           num_images=1000)
    two_stage = memory.estimate(FineTuneSpec(**sized), num_classes=10, num_images=1000)
    head_only = memory.estimate(FineTuneSpec(freeze={"strategy": "head_only"}, **sized),
                                num_classes=10, num_images=1000)
    assert fast.total_bytes == head_only.total_bytes < two_stage.total_bytes / 2
    assert fast.parts["cached features"] > 0 and two_stage.parts["cached features"] == 0


def test_a_run_that_cannot_fit_is_refused_before_anything_is_built(tiny_folder):
    huge = {"freeze": {"strategy": "none"}, "image_size": 1024, "batch_size": 4096,
            "epochs": 1}
    with pytest.raises(ResourceError, match=r"needs about .* GB .* lower batch_size"):
        fit(tiny_folder, huge)
