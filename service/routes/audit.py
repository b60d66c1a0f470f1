"""The audit log: admins read their tenant's, operators everyone's."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from ftune.service.audit import audit_log, audit_view
from ftune.service.auth.tenants import visible_tenant
from ftune.service.deps import Admin, Ctx
from ftune.service.pages import DEFAULT_LIMIT, Cursor, Limit, Page
from ftune.service.schemas import AuditOut

router = APIRouter(tags=["audit"])


@router.get("/audit", response_model=Page[AuditOut])
def read(ctx: Ctx, who: Admin, tenant: Annotated[str | None, Query()] = None,
         limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None) -> dict:
    """Newest first. Each row's ``id`` is its number within its tenant's log (1, 2, 3 ...;
    operators' own rows, with no tenant, are numbered apart): with ``tenant_id`` it names
    the row."""
    with ctx.db.session() as session:
        tenant_id = visible_tenant(session, who, tenant).id if tenant else None
        entries, next_cursor = audit_log(session, who, tenant_id=tenant_id, limit=limit,
                                         cursor=cursor)
        return {"items": [audit_view(e) for e in entries], "next_cursor": next_cursor}
