"""Why a model said what it said: Grad-CAM heat maps of the evidence for a class.

Grad-CAM (Selvaraju et al., ICCV 2017) weighs each channel of a convolutional feature map by
the mean gradient of the class's score over it and keeps the positive sum: where in the image
the features that raised that score sit. It is computed by Captum's ``LayerGradCam`` (the
PyTorch project's attribution library: maintained, tested, and with no dependencies beyond
ours) on the backbone's last feature map, timm's ``forward_features``: the last convolutional
stage, before pooling, which every backbone here has. A heat map costs a backward pass, so
callers ask for it; it never runs with plain predictions.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from torch import nn

from ftune.models.data.images import open_rgb
from ftune.models.data.transforms import normalize, resize_center_crop
from ftune.models.network import FineTuneModel
from ftune.models.preprocessing import Preprocessing

OVERLAY_ALPHA = 0.5  # the heat map's share of each overlay pixel
ARRAY_DECIMALS = 3
WORST_EXPLAINED = 8  # of the evaluation's worst files, best first
THUMBNAIL_SIDE = 112  # their overlays kept in the evaluation, at most this wide


class _LastFeatureMap(nn.Module):
    """The backbone up to its last feature map: a layer Captum can hook."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)  # type: ignore[operator]


class _Split(nn.Module):
    """``FineTuneModel``'s forward, through ``_LastFeatureMap`` then timm's pooling and head."""

    def __init__(self, model: FineTuneModel) -> None:
        super().__init__()
        self.model, self.features = model, _LastFeatureMap(model.backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.model.backbone.forward_head(self.features(x))  # type: ignore[operator]
        return self.model.head(pooled)


@dataclass
class HeatMaps:
    maps: torch.Tensor  # [N, h, w] at the feature map's resolution, each in [0, 1]
    classes: list[int]  # the class each map explains

    def upsampled(self, size: int) -> torch.Tensor:
        """[N, size, size] in [0, 1], bilinear: for overlays and pointing at pixels."""
        from captum.attr import LayerAttribution  # type: ignore[import-untyped]

        return LayerAttribution.interpolate(self.maps[:, None], (size, size),
                                            "bilinear")[:, 0].clamp(0, 1)


def grad_cam(model: FineTuneModel, batch: torch.Tensor, prep: Preprocessing,
             classes: list[int] | None = None) -> HeatMaps:
    """Heat maps for a uint8 ``[N, 3, S, S]`` batch, of the evidence for ``classes`` (one
    per image; default each image's top class). The model stays in eval mode: BatchNorm and
    dropout act as in a prediction."""
    # Imported when first used: Captum loads modules of its own that nothing before a run's
    # evaluation needs.
    from captum.attr import LayerGradCam

    device = next(model.parameters()).device
    # Inputs that need a gradient: the feature map then needs one too, frozen backbone or not.
    inputs = normalize(batch.to(device), prep).requires_grad_(True)
    split = _Split(model).eval()
    with torch.enable_grad():
        if classes is None:
            with torch.no_grad():
                classes = split(inputs).argmax(1).tolist()
        attributions = LayerGradCam(split, split.features).attribute(
            inputs, target=list(classes), relu_attributions=True)
    maps = attributions.detach().float().sum(1).cpu()
    peak = maps.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]
    return HeatMaps((maps / peak).clamp(0, 1), list(classes))


def as_array(heat_map: torch.Tensor) -> list[list[float]]:
    """A small heat map as JSON: rows of values in [0, 1]."""
    return [[round(v, ARRAY_DECIMALS) for v in row] for row in heat_map.tolist()]


def overlay_png(image: np.ndarray, heat_map: torch.Tensor, side: int | None = None) -> bytes:
    """The image (uint8 HWC) under its heat map (upsampled to the image, [0, 1]) in the
    jet colours, as PNG bytes (``side``: at most that wide)."""
    colours = colormaps["jet"](heat_map.numpy())[..., :3]  # [S, S, 3] in [0, 1]
    blended = (1 - OVERLAY_ALPHA) * image.astype(np.float32) / 255 + OVERLAY_ALPHA * colours
    picture = Image.fromarray((blended * 255).round().clip(0, 255).astype(np.uint8))
    if side is not None and picture.width > side:
        picture = picture.resize((side, side), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


def overlay_base64(image: np.ndarray, heat_map: torch.Tensor, side: int | None = None) -> str:
    return base64.b64encode(overlay_png(image, heat_map, side)).decode("ascii")


def explain_worst(model: FineTuneModel, prep: Preprocessing, root: Path, summary: dict,
                     classes: list[str]) -> None:
    """The evaluation's worst files (``highest_loss``, or a multi-label model's ``worst``:
    the most confident mistakes first) get, in place, the class explained (single-label:
    the answer given; multi-label: its surest false positive, else its first missed label),
    its heat map and a small overlay: where the model looked."""
    rows = [(row, label) for row in (summary.get("highest_loss") or summary.get("worst")
                                     or [])[:WORST_EXPLAINED]
            if (label := _explained(row)) is not None and (root / row["path"]).is_file()]
    if not rows:
        return
    batch = torch.stack([resize_center_crop(open_rgb(root / row["path"]), prep,
                                            prep.input_size) for row, _ in rows])
    maps = grad_cam(model, batch, prep, [classes.index(label) for _, label in rows])
    full = maps.upsampled(prep.input_size)
    for i, (row, label) in enumerate(rows):
        row.update(explained=label, heatmap=as_array(maps.maps[i]),
                   overlay_png=overlay_base64(batch[i].permute(1, 2, 0).numpy(), full[i],
                                              THUMBNAIL_SIDE))


def _explained(row: dict) -> str | None:
    if "predicted" in row:  # single-label
        return str(row["predicted"])
    wrong = sorted(row.get("false_positives") or [], key=lambda fp: -fp["score"])
    if wrong:
        return str(wrong[0]["label"])
    missed = row.get("missed") or row.get("true") or []
    return str(missed[0]) if missed else None
