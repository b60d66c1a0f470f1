"""Tenants and their quotas: operators create and remove them and set limits."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from ftune.service.auth.principal import Principal
from ftune.service.db.tables import Tenant
from ftune.service.errors import Conflict, InvalidInput, NotFound
from ftune.service.ids import is_id
from ftune.service.pages import DEFAULT_LIMIT, Keyset, read_page

TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_.\-]{0,99}")


class QuotaOverrides(BaseModel):
    """A tenant's own limits; a missing one takes the service default (FTUNE_QUOTA_*,
    FTUNE_MAX_KEYS_PER_TENANT, FTUNE_MAX_UPLOADS_PER_TENANT)."""

    model_config = ConfigDict(extra="forbid")

    stored_gb: float | None = Field(None, ge=0, description="Datasets, models and exports.")
    datasets: int | None = Field(None, ge=0, description="Datasets held.")
    active_jobs: int | None = Field(None, ge=0, description="Queued plus running jobs.")
    running_jobs: int | None = Field(None, ge=0, description="Jobs running at once.")
    epoch_images: int | None = Field(None, ge=1, description="Epochs × images of one job.")
    compute_hours: float | None = Field(None, ge=0, description="Worker hours per rolling 24 h.")
    keys: int | None = Field(None, ge=1, description="API keys that work (revoked and expired "
                             "ones not counted).")
    uploads_at_once: int | None = Field(None, ge=1, description="Dataset uploads streamed and "
                                        "unpacked at once, over every API process.")


def create_tenant(session: Session, *, name: str,
                  quotas: QuotaOverrides | None = None) -> Tenant:
    if not TENANT_NAME.fullmatch(name):
        raise InvalidInput("name: 1 to 100 of a-z, 0-9, '-', '_' or '.', starting with a "
                           "letter or digit")
    if session.scalar(select(Tenant).where(Tenant.name == name)) is not None:
        raise Conflict(f"a tenant named {name!r} already exists")
    tenant = Tenant(name=name, quotas=(quotas or QuotaOverrides()).model_dump(
        exclude_none=True))
    session.add(tenant)
    session.flush()
    return tenant


def get_tenant(session: Session, ref: str) -> Tenant:
    """A tenant by id or by name."""
    tenant = session.get(Tenant, ref) if is_id(ref) else session.scalar(
        select(Tenant).where(Tenant.name == ref))
    if tenant is None:
        raise NotFound(f"tenant {ref} not found")
    return tenant


def visible_tenant(session: Session, principal: Principal, ref: str) -> Tenant:
    tenant = get_tenant(session, ref)
    if not principal.can_see(tenant.id):
        raise NotFound(f"tenant {ref} not found")
    return tenant


def list_tenants(session: Session, *, limit: int = DEFAULT_LIMIT, cursor: str | None = None
                 ) -> tuple[list[Tenant], str | None]:
    """Oldest first, a page at a time."""
    return read_page(session, select(Tenant),
                     Keyset(Tenant.created_at, Tenant.id, descending=False), limit=limit,
                     cursor=cursor)


def set_quotas(session: Session, tenant: Tenant, overrides: QuotaOverrides) -> Tenant:
    """Replace the tenant's overrides (a null value goes back to the default)."""
    tenant.quotas = overrides.model_dump(exclude_none=True)
    session.flush()
    return tenant


def tenant_view(tenant: Tenant) -> dict:
    return {"id": tenant.id, "name": tenant.name, "created_at": tenant.created_at,
            "quotas": tenant.quotas}
