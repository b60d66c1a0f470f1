"""Backbone registry over timm with offline pretrained weights."""

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
