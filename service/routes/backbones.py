from __future__ import annotations

from fastapi import APIRouter

from ftune.service.backbones import catalog
from ftune.service.deps import Ctx

router = APIRouter(tags=["backbones"])


@router.get("/backbones")
def list_backbones(ctx: Ctx) -> list[dict]:
    """The backbones a job may name: those with ImageNet weights on this server
    (``pretrained_offline``), and measured timm architectures trained from scratch
    (``pretrained: false``), with their sizes. Answered without loading torch."""
    return catalog(ctx.settings)
