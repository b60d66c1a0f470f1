"""The audit log: admins read their tenant's, operators everyone's."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from ftune.service.audit import audit_log, audit_view
from ftune.service.auth.tenants import visible_tenant
from ftune.service.deps import Admin, Ctx
from ftune.service.schemas import AuditOut

router = APIRouter(tags=["audit"])


@router.get("/audit", response_model=list[AuditOut])
def read(ctx: Ctx, who: Admin, tenant: Annotated[str | None, Query()] = None,
         before_id: Annotated[int | None, Query(ge=1, le=2**62)] = None,
         limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict]:
    """Newest first; page with ``before_id`` (the smallest id you have)."""
    with ctx.db.session() as session:
        tenant_id = visible_tenant(session, who, tenant).id if tenant else None
        return [audit_view(e) for e in audit_log(session, who, tenant_id=tenant_id,
                                                 before_id=before_id, limit=limit)]
