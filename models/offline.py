"""Offline by default: the one place that touches the environment to configure a library.

huggingface_hub (imported by timm) reads ``HF_HUB_OFFLINE`` once, when it is first imported, so
``ftune.models`` sets it as the package is imported, before any engine module imports timm. A
user opts in to downloads from the hub with ``FTUNE_ALLOW_DOWNLOADS=1``.
"""

from __future__ import annotations

import os
import sys

ALLOW_DOWNLOADS_VARIABLE = "FTUNE_ALLOW_DOWNLOADS"
_TRUE = frozenset({"1", "true", "yes", "on"})


def downloads_allowed() -> bool:
    return os.environ.get(ALLOW_DOWNLOADS_VARIABLE, "").strip().lower() in _TRUE


def prefer_offline() -> None:
    """Make huggingface_hub offline unless downloads were allowed."""
    if downloads_allowed():
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        # Imported before us (by the user's own code): it has read the variable already.
        constants.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]
