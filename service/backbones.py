"""Which backbones a job may use over HTTP, decided without importing torch.

- The registry's backbones whose ImageNet weights ship in installed packages, with or
  without those weights.
- Architectures measured in ``models/backbones/sizes.py`` up to ``FTUNE_BACKBONE_MAX_PARAMS_M``
  million parameters, trained from scratch (``pretrained: false``).
- Backbones named in ``FTUNE_BACKBONES_WITH_WEIGHTS``, whose weights an operator put in the
  workers' ``FTUNE_WEIGHTS_DIR``, also with ``pretrained: true``.

Anything else is a 422 at submit that lists what is available, never a failure on a worker.
"""

from __future__ import annotations

import importlib.util

from ftune.models.backbones.catalog import PACKAGED_BACKBONES
from ftune.models.backbones.sizes import BACKBONE_SIZES
from ftune.models.spec import FineTuneSpec
from ftune.service.errors import InvalidInput
from ftune.service.settings import Settings


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def from_scratch(settings: Settings) -> list[str]:
    cap = settings.backbone_max_params_m * 1e6
    return sorted(name for name, (params, *_) in BACKBONE_SIZES.items() if params <= cap)


def with_weights(settings: Settings) -> list[str]:
    packaged = [n for n, e in PACKAGED_BACKBONES.items() if _installed(e.module)]
    return sorted({*packaged, *settings.extra_weighted_backbones})


def check_backbone(spec: FineTuneSpec, settings: Settings) -> None:
    """422 naming ``backbone`` when the spec asks for one this service does not offer."""
    pretrained = with_weights(settings)
    allowed = pretrained if spec.pretrained else sorted({*pretrained, *PACKAGED_BACKBONES,
                                                         *from_scratch(settings)})
    if spec.backbone in allowed:
        return
    if spec.pretrained and spec.backbone in from_scratch(settings):
        raise InvalidInput(f"backbone: {spec.backbone!r} has no pretrained weights on this "
                           f"server; set pretrained: false to train it from scratch, or use "
                           f"one with weights: {', '.join(pretrained)}")
    raise InvalidInput(f"backbone: {spec.backbone!r} is not available here. With ImageNet "
                       f"weights: {', '.join(pretrained)}. From scratch (pretrained: false): "
                       f"{', '.join(from_scratch(settings))}. GET /v1/backbones lists them")


def catalog(settings: Settings) -> list[dict]:
    """GET /v1/backbones: every backbone a job may name, with what it takes."""
    rows = []
    for name in sorted({*PACKAGED_BACKBONES, *with_weights(settings), *from_scratch(settings)}):
        entry = PACKAGED_BACKBONES.get(name)
        params, features, *_ = BACKBONE_SIZES.get(entry.architecture if entry else name,
                                                  (None, None, None, None))
        weighted = name in with_weights(settings)
        rows.append({
            "name": name, "architecture": entry.architecture if entry else name,
            "pretrained_offline": weighted,
            "weights_source": (f"package {entry.module}" if entry and weighted
                               else "the workers' FTUNE_WEIGHTS_DIR" if weighted else None),
            "input_size": entry.input_size if entry else None,
            "mean": entry.mean if entry else None, "std": entry.std if entry else None,
            "interpolation": entry.interpolation if entry else None,
            "crop_pct": entry.crop_pct if entry else None,
            "num_params": params, "num_features": features,
            "license": entry.license if entry else None})
    return rows
