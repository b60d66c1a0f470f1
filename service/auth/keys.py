"""API keys: made here, shown once, stored as a SHA-256."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from ftune.service.auth.principal import Principal, Role
from ftune.service.auth.tenancy import get_visible, visible_rows
from ftune.service.db.tables import ApiKey, Tenant, utcnow
from ftune.service.errors import InvalidInput, NotFound
from ftune.service.pages import DEFAULT_LIMIT, Keyset, read_page
from ftune.service.quotas import check_new_key, lock_tenant
from ftune.service.settings import Settings

KEY_PREFIX = "ftk_"
_KEY_BYTES = 32  # 256 bits
SHOWN_PREFIX = 12  # "ftk_" and 8 characters: enough to tell keys apart, useless to guess
MAX_NAME = 100


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def looks_like_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX) and 20 <= len(token) <= 200 and token.isascii()


def create_key(session: Session, *, role: Role, tenant_id: str | None, name: str,
               expires_at: datetime | None = None,
               settings: Settings | None = None) -> tuple[ApiKey, str]:
    """A new key and its plaintext (the only time it exists outside the caller).

    With ``settings`` (the API) a tenant's key counts against its ``keys`` limit, checked
    under the tenant's lock so that racing requests cannot pass it together; the admin
    command and the launcher, run on the server itself, make keys without it."""
    name = name.strip()
    if not name or len(name) > MAX_NAME or any(ord(c) < 32 for c in name):
        raise InvalidInput(f"name: 1 to {MAX_NAME} printable characters")
    if expires_at is not None and expires_at <= utcnow():
        raise InvalidInput("expires_at: must be in the future")
    if role is Role.OPERATOR:
        tenant_id = None
    elif settings is not None and tenant_id is not None:
        lock_tenant(session, tenant_id)  # 404 when the tenant is gone
        check_new_key(session, tenant_id, settings)
    elif tenant_id is None or session.get(Tenant, tenant_id) is None:
        raise NotFound(f"tenant {tenant_id} not found")
    plaintext = KEY_PREFIX + secrets.token_urlsafe(_KEY_BYTES)
    key = ApiKey(tenant_id=tenant_id, name=name, role=str(role), key_hash=hash_key(plaintext),
                 prefix=plaintext[:SHOWN_PREFIX], expires_at=expires_at)
    session.add(key)
    session.flush()
    return key, plaintext


def list_keys(session: Session, principal: Principal, tenant_id: str | None = None,
              *, include_revoked: bool = False, limit: int = DEFAULT_LIMIT,
              cursor: str | None = None) -> tuple[list[ApiKey], str | None]:
    """Newest first, a page at a time."""
    query = visible_rows(principal, ApiKey, tenant_id=tenant_id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return read_page(session, query, Keyset(ApiKey.created_at, ApiKey.id), limit=limit,
                     cursor=cursor)


def get_key(session: Session, principal: Principal, key_id: str) -> ApiKey:
    return get_visible(session, principal, ApiKey, key_id, noun="key")


def revoke_key(session: Session, principal: Principal, key_id: str) -> ApiKey:
    key = get_key(session, principal, key_id)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    return key


def operator_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.role == str(Role.OPERATOR),
                                                     ApiKey.revoked_at.is_(None))))


def key_view(key: ApiKey) -> dict:
    return {"id": key.id, "name": key.name, "role": key.role, "tenant_id": key.tenant_id,
            "prefix": key.prefix, "created_at": key.created_at,
            "last_used_at": key.last_used_at, "expires_at": key.expires_at,
            "revoked_at": key.revoked_at}
