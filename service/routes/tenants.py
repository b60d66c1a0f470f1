"""Tenants and quotas: operators create, inspect and remove tenants and set their limits;
every caller can see its own tenant's usage."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from ftune.service.auth.tenants import (
    QuotaOverrides,
    create_tenant,
    list_tenants,
    set_quotas,
    tenant_view,
    visible_tenant,
)
from ftune.service.deps import Ctx, Member, Operator
from ftune.service.pages import DEFAULT_LIMIT, Cursor, Limit, Page
from ftune.service.quotas import limits_of, usage_of, usage_view
from ftune.service.removal import remove_tenant
from ftune.service.schemas import TenantIn, TenantOut, UsageOut

router = APIRouter(tags=["tenants"])


@router.post("/tenants", status_code=201, response_model=TenantOut)
def create(body: TenantIn, request: Request, ctx: Ctx, who: Operator) -> dict:
    """Operators only: a new tenant (then make its first admin key with POST /v1/keys)."""
    with ctx.db.session() as session:
        tenant = create_tenant(session, name=body.name, quotas=body.quotas)
        request.state.audit_object = tenant.id
        return tenant_view(tenant)


@router.get("/tenants", response_model=Page[TenantOut])
def list_all(ctx: Ctx, who: Operator, limit: Limit = DEFAULT_LIMIT,
             cursor: Cursor = None) -> dict:
    """Oldest first."""
    with ctx.db.session() as session:
        tenants, next_cursor = list_tenants(session, limit=limit, cursor=cursor)
        return {"items": [tenant_view(t) for t in tenants], "next_cursor": next_cursor}


@router.get("/tenants/{tenant_ref}", response_model=TenantOut)
def get_one(tenant_ref: str, ctx: Ctx, who: Operator) -> dict:
    with ctx.db.session() as session:
        return tenant_view(visible_tenant(session, who, tenant_ref))


@router.put("/tenants/{tenant_ref}/quotas", response_model=TenantOut)
def put_quotas(tenant_ref: str, body: QuotaOverrides, ctx: Ctx, who: Operator) -> dict:
    """Operators only: the tenant's own limits; a limit left out takes the default."""
    with ctx.db.session() as session:
        return tenant_view(set_quotas(session, visible_tenant(session, who, tenant_ref), body))


@router.get("/tenants/{tenant_ref}/usage", response_model=UsageOut)
def tenant_usage(tenant_ref: str, ctx: Ctx, who: Operator) -> dict:
    with ctx.db.session() as session:
        tenant = visible_tenant(session, who, tenant_ref)
        return {"tenant_id": tenant.id, **usage_view(usage_of(session, tenant.id),
                                                     limits_of(tenant, ctx.settings))}


@router.delete("/tenants/{tenant_ref}", status_code=204)
async def delete(tenant_ref: str, ctx: Ctx, who: Operator) -> Response:
    """Operators only: cancel the tenant's jobs and remove everything it owns (datasets,
    jobs, models, downloads, keys). The default tenant stays."""
    await run_in_threadpool(remove_tenant, ctx.db, ctx.storage, who, tenant_ref)
    return Response(status_code=204)


@router.get("/usage", response_model=UsageOut)
def my_usage(ctx: Ctx, who: Member) -> dict:
    """What the caller's tenant holds and uses, against its limits."""
    from ftune.service.db.tables import Tenant

    with ctx.db.session() as session:
        tenant_id = who.home_tenant
        return {"tenant_id": tenant_id, **usage_view(
            usage_of(session, tenant_id), limits_of(session.get(Tenant, tenant_id),
                                                    ctx.settings))}
