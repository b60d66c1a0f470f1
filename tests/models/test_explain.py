"""Grad-CAM explanations held to the two checks that catch a broken one, on real images:
the pointing game (the heat map's peak falls on the object, on images made so its place is
known) and the model-randomisation sanity check (Adebayo et al., "Sanity Checks for Saliency
Maps", NeurIPS 2018: re-initialising the head and the top stages must change the maps)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr  # type: ignore[import-untyped]

from ftune.models.bundle import save_bundle
from ftune.models.explain import THUMBNAIL_SIDE, WORST_EXPLAINED, grad_cam
from ftune.models.predictor import Predictor
from ftune.models.spec import parse_spec
from ftune.models.training.fit import fit
from ftune.testing.pasted import write_pasted

CANVAS = 160
# Measured: 55 of 60 test images (0.917) have the peak inside the tile; the target is 0.8.
POINTING_TARGET = 0.8
# Measured: mean rank correlation 0.050 between the trained and the re-initialised maps.
RANDOMISED_BOUND = 0.5


@pytest.fixture(scope="module")
def pasted_model(tmp_path_factory):
    """animal0, animal1 and digit2 tiles pasted on grey: trained, then loaded to predict."""
    root = tmp_path_factory.mktemp("pasted") / "data"
    boxes = write_pasted(root, [0, 1, 12], {"train": 150, "test": 60}, canvas=CANVAS, seed=2)
    result = fit(root, parse_spec({"image_size": CANVAS, "epochs": 4, "batch_size": 16,
                                   "seed": 1, "freeze": {"strategy": "last_n_blocks",
                                                         "n_blocks": 2}}), device="cpu")
    bundle = save_bundle(result, tmp_path_factory.mktemp("models") / "pasted")
    return root, boxes, Predictor.load(bundle, device="cpu"), result.evaluation


def _seen(predictor: Predictor, root, boxes) -> tuple[torch.Tensor, list[list[float]]]:
    """The test images as the model sees them (resized, centre-cropped) and their tiles'
    boxes moved the same way."""
    prep = predictor.preprocessing
    scale = prep.resize_size / CANVAS
    offset = (prep.resize_size - prep.input_size) / 2
    paths = sorted(boxes)
    batch = predictor.to_uint8([Image.open(root / p) for p in paths])
    moved = [[v * scale - offset for v in boxes[p]] for p in paths]
    return batch, moved


def test_the_heat_maps_peak_falls_on_the_pasted_object(pasted_model):
    root, boxes, predictor, _ = pasted_model
    batch, moved = _seen(predictor, root, boxes)
    maps = grad_cam(predictor.model, batch, predictor.preprocessing)
    full = maps.upsampled(predictor.preprocessing.input_size)
    hits = 0
    for heat, (x0, y0, x1, y1) in zip(full, moved, strict=True):
        y, x = divmod(int(heat.flatten().argmax()), heat.shape[1])
        hits += x0 <= x + 0.5 <= x1 and y0 <= y + 0.5 <= y1
    fraction = hits / len(moved)
    print(f"pointing game: {hits}/{len(moved)} = {fraction:.3f}")
    assert fraction >= POINTING_TARGET


def test_re_initialising_the_top_of_the_network_changes_the_heat_maps(pasted_model):
    root, boxes, predictor, _ = pasted_model
    batch, _ = _seen(predictor, root, boxes)
    trained = grad_cam(predictor.model, batch, predictor.preprocessing)
    # The same classes explained, by the network with its head and top stages re-drawn.
    torch.manual_seed(0)
    backbone = predictor.model.backbone
    for module in (predictor.model.head, *backbone.blocks[-2:], backbone.conv_head, backbone.bn2):
        for layer in module.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
    randomised = grad_cam(predictor.model, batch, predictor.preprocessing, trained.classes)
    correlations = [spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic
                    for a, b in zip(trained.maps, randomised.maps, strict=True)]
    mean = float(np.nanmean(correlations))
    print(f"randomisation check: mean rank correlation {mean:.3f}")
    assert mean < RANDOMISED_BOUND
    # The check itself can fail: a model compared with itself correlates perfectly.
    assert spearmanr(trained.maps[0].flatten(), trained.maps[0].flatten()).statistic > 0.99


def test_the_worst_test_files_carry_heat_maps_of_the_class_given(pasted_model):
    root, _, predictor, evaluation = pasted_model
    worst = evaluation["test"]["highest_loss"]
    explained = [row for row in worst if "heatmap" in row]
    assert explained and len(explained) == min(len(worst), WORST_EXPLAINED)
    side = predictor.preprocessing.input_size // 32  # the last feature map's
    for row in explained:
        assert row["explained"] == row["predicted"]
        assert len(row["heatmap"]) == side and max(map(max, row["heatmap"])) == 1.0
        overlay = Image.open(io.BytesIO(base64.b64decode(row["overlay_png"])))
        assert overlay.size == (THUMBNAIL_SIDE, THUMBNAIL_SIDE)
        assert (root / row["path"]).is_file()
