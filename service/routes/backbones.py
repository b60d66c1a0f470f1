from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["backbones"])


@router.get("/backbones")
def list_backbones() -> list[dict]:
    """Backbones with ImageNet weights available offline on this server."""
    from ftune.models.backbones import list_backbones as registry

    return [info.to_dict() for info in registry()]
