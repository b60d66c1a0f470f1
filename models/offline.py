"""Offline by default: the one place that sets huggingface_hub's offline mode.

huggingface_hub (imported by timm) reads ``HF_HUB_OFFLINE`` once, when it is first imported, so
``ftune.models`` sets it as the package is imported (``prefer_offline``), before any engine
module imports timm. From then on the engine's settings decide: ``allow_downloads`` is applied
(``use_downloads``) whenever settings become current (``ftune.models.settings``), so
``configure(EngineSettings(allow_downloads=True))`` and the hub always agree. A user opts in
with ``FTUNE_ALLOW_DOWNLOADS=1`` or that setting.
"""

from __future__ import annotations

import os
import sys

ALLOW_DOWNLOADS_VARIABLE = "FTUNE_ALLOW_DOWNLOADS"  # EngineSettings.allow_downloads
HUB_OFFLINE_VARIABLE = "HF_HUB_OFFLINE"
# What pydantic reads as true for a bool setting, so the import-time default and the settings
# read later from the same variable agree.
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_HUB_TRUE = frozenset({"1", "ON", "YES", "TRUE"})  # what huggingface_hub reads as true

_forced = False  # whether we made the hub offline (and so may undo it)
_set_variable = False  # whether HF_HUB_OFFLINE is ours rather than the user's


def prefer_offline() -> None:
    """At import, before any settings exist: offline unless the environment allows
    downloads. The variable is the one ``EngineSettings.allow_downloads`` is read from."""
    use_downloads(os.environ.get(ALLOW_DOWNLOADS_VARIABLE, "").strip().lower() in _TRUE)


def use_downloads(allowed: bool) -> None:
    """Make huggingface_hub offline, or undo what an earlier call did (a user's own
    ``HF_HUB_OFFLINE`` stays as they set it)."""
    global _forced, _set_variable
    if not allowed:
        if HUB_OFFLINE_VARIABLE not in os.environ:
            os.environ[HUB_OFFLINE_VARIABLE] = "1"
            _set_variable = True
        _forced = True
        _set_hub_constant(True)
    elif _forced:
        if _set_variable:
            os.environ.pop(HUB_OFFLINE_VARIABLE, None)
        _forced = _set_variable = False
        _set_hub_constant(_hub_offline_by_environment())


def _set_hub_constant(offline: bool) -> None:
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        # Imported already (by timm, or by the user's own code): it has read the variable, and
        # reads this attribute on every request.
        constants.HF_HUB_OFFLINE = offline  # type: ignore[attr-defined]  # a module global


def _hub_offline_by_environment() -> bool:
    value = os.environ.get(HUB_OFFLINE_VARIABLE) or os.environ.get("TRANSFORMERS_OFFLINE")
    return (value or "").upper() in _HUB_TRUE
