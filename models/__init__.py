"""The fine-tuning engine: pure ML, usable as a library and from the ``ftune`` CLI.

Heavy modules (torch, timm) load on first use, so ``models.spec`` stays cheap to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.backbones import create_backbone, list_backbones
    from models.bundle import save_bundle
    from models.predictor import Predictor
    from models.spec import FineTuneSpec
    from models.training.fit import Callbacks, FitResult, fit

_EXPORTS = {
    "FineTuneSpec": "models.spec",
    "fit": "models.training.fit",
    "Callbacks": "models.training.fit",
    "FitResult": "models.training.fit",
    "save_bundle": "models.bundle",
    "Predictor": "models.predictor",
    "create_backbone": "models.backbones",
    "list_backbones": "models.backbones",
}

__all__ = [  # noqa: RUF022 - grouped by module, like _EXPORTS
    "FineTuneSpec", "fit", "Callbacks", "FitResult", "save_bundle", "Predictor",
    "create_backbone", "list_backbones",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
