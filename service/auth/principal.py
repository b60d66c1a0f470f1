"""Who a request acts as: a key's tenant and role. Roles nest: operator > admin > member."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ftune.service.db.tables import DEFAULT_TENANT_ID
from ftune.service.errors import Forbidden


class Role(StrEnum):
    MEMBER = "member"  # upload, train, predict, download
    ADMIN = "admin"  # also keys, aliases, deletions, the audit log of the tenant
    OPERATOR = "operator"  # also tenants and quotas; sees every tenant

    @property
    def rank(self) -> int:
        return _RANKS[self]


_RANKS = {Role.MEMBER: 0, Role.ADMIN: 1, Role.OPERATOR: 2}


@dataclass(frozen=True)
class Principal:
    role: Role
    tenant_id: str | None  # None: an operator key, which belongs to no tenant
    key_id: str | None = None  # None: FTUNE_AUTH=off
    key_name: str = ""

    @property
    def is_operator(self) -> bool:
        return self.role is Role.OPERATOR

    @property
    def home_tenant(self) -> str:
        """Where what this principal creates belongs: operators create in the default tenant."""
        return self.tenant_id or DEFAULT_TENANT_ID

    def can_see(self, tenant_id: str | None) -> bool:
        """Whether this principal may see what ``tenant_id`` owns (see auth/tenancy.py)."""
        return self.is_operator or (tenant_id is not None and tenant_id == self.tenant_id)

    def require(self, role: Role, what: str) -> None:
        if self.role.rank < role.rank:
            raise Forbidden(f"{what} needs an {role} key (this key is a {self.role})")


# What every request acts as when FTUNE_AUTH=off (loopback only): a single user.
LOCAL_USER = Principal(Role.OPERATOR, DEFAULT_TENANT_ID, None, "local (FTUNE_AUTH=off)")
