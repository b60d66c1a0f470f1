"""Backbone registry over timm with offline pretrained weights.

``catalog`` and ``sizes`` are plain data (the API reads them without torch); the registry
functions load timm and torch on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ftune.models.backbones.registry import (
        Backbone,
        BackboneInfo,
        architecture_of,
        create_backbone,
        describe_backbone,
        list_backbones,
    )

__all__ = [
    "Backbone",
    "BackboneInfo",
    "architecture_of",
    "create_backbone",
    "describe_backbone",
    "list_backbones",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ftune.models.backbones import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'ftune.models.backbones' has no attribute {name!r}")
