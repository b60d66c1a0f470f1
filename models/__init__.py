"""The fine-tuning engine: pure ML, usable as a library and from the ``ftune`` CLI.

Heavy modules (torch, timm) load on first use, so ``ftune.models.spec`` stays cheap to import.
Importing this package makes the model hub offline unless ``FTUNE_ALLOW_DOWNLOADS`` is set; it
must happen before timm loads, and every engine module is imported through this package. That
is all an import changes: the rest of the process-wide state the settings decide (PIL's image
limit, a warnings filter) is set by ``ftune.models.settings.configure``, the explicit step
ftune's own entry points take at start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ftune.models.offline import prefer_offline

prefer_offline()

if TYPE_CHECKING:
    from ftune.models.backbones import create_backbone, list_backbones
    from ftune.models.bundle import save_bundle
    from ftune.models.predictor import Predictor
    from ftune.models.spec import FineTuneSpec
    from ftune.models.training.fit import Callbacks, FitResult, fit

_EXPORTS = {
    "FineTuneSpec": "ftune.models.spec",
    "fit": "ftune.models.training.fit",
    "Callbacks": "ftune.models.training.fit",
    "FitResult": "ftune.models.training.fit",
    "save_bundle": "ftune.models.bundle",
    "Predictor": "ftune.models.predictor",
    "create_backbone": "ftune.models.backbones",
    "list_backbones": "ftune.models.backbones",
}

__all__ = [  # noqa: RUF022 - grouped by module, like _EXPORTS
    "FineTuneSpec", "fit", "Callbacks", "FitResult", "save_bundle", "Predictor",
    "create_backbone", "list_backbones",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ftune.models' has no attribute {name!r}")
