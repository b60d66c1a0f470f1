"""Who may see what, written once: every row a tenant owns has a ``tenant_id``; a caller
sees its own tenant's rows, an operator every tenant's.

Another tenant's id answers 404, never 403: a 403 would confirm that the id exists, and ids
are all a caller could probe with. Service functions look objects up with ``get_visible``
(or check a row found another way with ``visible_or_404``) and list them from
``visible_rows``. Only rows that are not a tenant's objects (a tenant itself, a loaded model's
batcher) use ``Principal.can_see`` directly.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, TypeVar

from sqlalchemy import FromClause, Select, select
from sqlalchemy.orm import Session

from ftune.service.auth.principal import Principal
from ftune.service.errors import NotFound
from ftune.service.ids import is_id


class Owned(Protocol):
    """A table whose rows belong to a tenant (``None``: to no tenant, e.g. operator keys)."""

    __table__: ClassVar[FromClause]

    @property
    def tenant_id(self) -> str | None: ...


T = TypeVar("T", bound=Owned)


def visible_or_404(principal: Principal, row: T | None, *, not_found: str) -> T:
    """``row`` when it exists and the caller's tenant may see it; else 404 with
    ``not_found`` as the message, the same whether it is missing or another tenant's."""
    if row is None or not principal.can_see(row.tenant_id):
        raise NotFound(not_found)
    return row


def get_visible(session: Session, principal: Principal, table: type[T], object_id: str, *,
                noun: str) -> T:
    """The row of ``table`` with this id, if the caller may see it; 404 ("<noun> <id> not
    found") otherwise. A malformed id is a 404 too, without a query."""
    row = session.get(table, object_id) if is_id(object_id) else None
    return visible_or_404(principal, row, not_found=f"{noun} {object_id} not found")


def visible_rows(principal: Principal, table: type[T], *,
                 tenant_id: str | None = None) -> Select[T]:
    """SELECT of the caller's rows of ``table``: its tenant's, or for an operator every
    tenant's (only ``tenant_id``'s when given; callers check that tenant exists first)."""
    query = select(table)
    owner = table.__table__.c.tenant_id
    if not principal.is_operator:
        return query.where(owner == principal.tenant_id)
    return query if tenant_id is None else query.where(owner == tenant_id)
