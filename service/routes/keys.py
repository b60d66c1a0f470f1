"""API keys of a tenant: its admins make, list and revoke them (operators: any tenant's)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from ftune.service.auth.keys import create_key, key_view, list_keys, revoke_key
from ftune.service.auth.principal import Principal, Role
from ftune.service.auth.tenants import visible_tenant
from ftune.service.deps import Admin, Ctx
from ftune.service.pages import DEFAULT_LIMIT, Cursor, Limit, Page
from ftune.service.schemas import KeyIn, KeyOut, NewKeyOut

router = APIRouter(tags=["keys"])


@router.post("/keys", status_code=201, response_model=NewKeyOut,
             responses={429: {"description": "the tenant holds as many keys as it may"}})
def create(body: KeyIn, request: Request, ctx: Ctx, who: Admin) -> JSONResponse:
    """A new key for the caller's tenant (operators: for ``tenant``, or an operator key).
    The key is in this response only; it is stored as a hash. A tenant holds at most
    FTUNE_MAX_KEYS_PER_TENANT keys that work (its ``keys`` quota): past it, 429."""
    role = Role(body.role)
    who.require(role if role is not Role.MEMBER else Role.ADMIN, f"making {role} keys")
    with ctx.db.session() as session:
        tenant_id = _target_tenant(session, who, body.tenant)
        key, plaintext = create_key(session, role=role, tenant_id=tenant_id, name=body.name,
                                    expires_at=body.expires_at, settings=ctx.settings)
        view = {**key_view(key), "key": plaintext}
    request.state.audit_object = view["id"]
    return JSONResponse(jsonable_encoder(NewKeyOut.model_validate(view)), status_code=201)


def _target_tenant(session: Session, who: Principal, tenant: str | None) -> str | None:
    if tenant is None:
        return who.home_tenant
    who.require(Role.OPERATOR, "choosing a key's tenant")
    return visible_tenant(session, who, tenant).id


@router.get("/keys", response_model=Page[KeyOut])
def list_all(ctx: Ctx, who: Admin, tenant: Annotated[str | None, Query()] = None,
             include_revoked: Annotated[bool, Query()] = False,
             limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None) -> dict:
    """The tenant's keys, newest first (never the keys themselves); operators see every
    tenant's."""
    with ctx.db.session() as session:
        tenant_id = visible_tenant(session, who, tenant).id if tenant else None
        keys, next_cursor = list_keys(session, who, tenant_id, include_revoked=include_revoked,
                                      limit=limit, cursor=cursor)
        return {"items": [key_view(k) for k in keys], "next_cursor": next_cursor}


@router.delete("/keys/{key_id}", status_code=204)
def revoke(key_id: str, ctx: Ctx, who: Admin) -> Response:
    """Revoke a key: every API process refuses it within a second, open event streams
    included."""
    with ctx.db.session() as session:
        revoke_key(session, who, key_id)
    return Response(status_code=204)
