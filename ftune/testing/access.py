"""Tenants and keys for tests and benchmarks, written straight into a stack's database (as
`ftune tenants create` and `ftune keys create` do)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from ftune.service.auth.keys import create_key
from ftune.service.auth.principal import Role
from ftune.service.auth.tenants import create_tenant, get_tenant
from ftune.service.db import migrate
from ftune.service.db.session import Database
from ftune.service.db.tables import DEFAULT_TENANT_NAME
from ftune.service.errors import NotFound


@dataclass(frozen=True)
class Key:
    key: str
    tenant: str | None  # name; None for operator keys
    role: Role

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def client(self, base_url: str, timeout: float = 5.0) -> httpx.Client:
        """An HTTP client acting as this key; ``timeout`` defaults to httpx's own."""
        return httpx.Client(base_url=base_url, headers=self.headers, timeout=timeout)


def make_key(database_url: str, *, role: Role, tenant: str | None = DEFAULT_TENANT_NAME,
             name: str = "test") -> Key:
    """A key of ``role`` in ``tenant`` (created when missing); an operator key with
    ``role=Role.OPERATOR``."""
    db = Database(database_url, prepare=migrate.upgrade)
    try:
        with db.session() as session:
            tenant_id = None
            if role is not Role.OPERATOR:
                assert tenant is not None
                try:
                    tenant_id = get_tenant(session, tenant).id
                except NotFound:
                    tenant_id = create_tenant(session, name=tenant).id
            _, plaintext = create_key(session, role=role, tenant_id=tenant_id, name=name)
    finally:
        db.dispose()
    return Key(plaintext, None if role is Role.OPERATOR else tenant, role)
