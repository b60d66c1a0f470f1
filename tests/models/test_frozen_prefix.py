"""Splitting a backbone at its frozen stages, and keeping what they make of the images."""

from __future__ import annotations

import pytest
import torch

from ftune.models.backbones import create_backbone
from ftune.models.network import FineTuneModel, build_head
from ftune.models.spec import HeadSpec
from ftune.models.training.prefix_cache import PrefixCache
from ftune.models.training.runtime import Precision
from ftune.models.tuning.frozen_prefix import split_frozen


@pytest.fixture(scope="module")
def lite0():
    backbone = create_backbone("tf_efficientnet_lite0", pretrained=False, image_size=32)
    model = FineTuneModel(backbone.model, build_head(backbone.num_features, 3, HeadSpec()))
    return model.eval(), backbone.stages


@pytest.mark.parametrize("n_trainable", [1, 3, 7])
def test_prefix_then_suffix_is_the_whole_model(lite0, n_trainable):
    model, stages = lite0
    split = split_frozen(model, stages, n_trainable)
    assert split is not None
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(split.suffix(split.prefix(images)), model(images), atol=1e-5)
    frozen = {n for stage in stages[:len(stages) - n_trainable] for n in stage}
    assert {n for n, _ in split.prefix.named_parameters()} != set()
    assert sum(p.numel() for p in split.prefix.parameters()) == sum(
        p.numel() for n, p in model.backbone.named_parameters() if n in frozen)


def test_no_split_when_nothing_or_everything_trains_or_a_frozen_layer_is_random(lite0):
    model, stages = lite0
    assert split_frozen(model, stages, 0) is None
    assert split_frozen(model, stages, len(stages)) is None
    model.backbone.blocks[0].append(torch.nn.Dropout(0.1))
    try:
        assert split_frozen(model, stages, 3) is None
    finally:
        del model.backbone.blocks[0][-1]
    assert split_frozen(model, stages, 3) is not None


def test_outputs_beyond_the_budget_are_not_kept(lite0):
    model, stages = lite0
    split = split_frozen(model, stages, 2)
    assert split is not None
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        per_image = split.prefix(images[:1]).numel() * 4  # float32

    def batches():
        return iter([(images[:2], labels[:2]), (images[2:], labels[2:])])

    precision = Precision(torch.device("cpu"), None)
    fits = PrefixCache(split, precision, per_image * 4)
    outputs, kept_labels = fits.outputs("train", 4, batches)
    assert outputs.shape[0] == 4 and torch.equal(kept_labels, labels)
    order = torch.tensor([3, 0])
    (batch, batch_labels), = list(fits.batches("train", order, 2))
    assert torch.equal(batch, outputs[order]) and torch.equal(batch_labels, labels[order])
    assert fits.bytes() == per_image * 4
    # A second split must fit beside the first.
    assert fits.outputs("val", 2, lambda: iter([(images[:2], labels[:2])])) is None
    assert fits.too_large
    too_small = PrefixCache(split, precision, per_image * 4 - 1)
    assert too_small.outputs("train", 4, batches) is None and too_small.too_large
