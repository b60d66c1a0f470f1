from __future__ import annotations

from fastapi import APIRouter

from ftune.service.backbones import catalog
from ftune.service.deps import Ctx
from ftune.service.pages import DEFAULT_LIMIT, Cursor, Limit, Page, page_of_list

router = APIRouter(tags=["backbones"])


@router.get("/backbones", response_model=Page[dict])
def list_backbones(ctx: Ctx, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None) -> dict:
    """The backbones a job may name: those with ImageNet weights on this server
    (``pretrained_offline``), and measured timm architectures trained from scratch
    (``pretrained: false``), with their sizes. Answered without loading torch."""
    items, next_cursor = page_of_list(catalog(ctx.settings), "name", limit=limit, cursor=cursor)
    return {"items": items, "next_cursor": next_cursor}
