"""The audit log: who did what. Every state-changing request that a key made is one row:
tenant, key, action (method and route), object id, status code and time.

An ASGI middleware, so it sees the final status of every route, streaming ones included, and
the route that matched. Handlers that create an object name it in ``request.state.audit_object``;
otherwise the object is the route's last path parameter (``/v1/sweeps/{sweep_id}/cancel``: the
sweep), whatever it is called, so a new route is audited with its object without a change
here. Requests without a valid key are not recorded (that would let anyone fill the table);
the log has them.

Each tenant's rows are numbered 1, 2, 3 ... (``seq``, shown as the row's ``id``), so a tenant's
log shows no gaps that other tenants' requests made.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ftune.service.auth.principal import Principal
from ftune.service.auth.tenancy import visible_rows
from ftune.service.db.numbering import insert_numbered
from ftune.service.db.session import Database
from ftune.service.db.tables import AuditEntry, utcnow
from ftune.service.pages import DEFAULT_LIMIT, Keyset, read_page

log = logging.getLogger(__name__)

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# POSTs that change nothing.
READ_ONLY_SUFFIXES = ("/predict",)


class AuditMiddleware:
    def __init__(self, app: ASGIApp, db: Database) -> None:
        self.app, self.db = app, db

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] not in STATE_CHANGING
                or not scope["path"].startswith("/v1/")
                or scope["path"].endswith(READ_ONLY_SUFFIXES)):
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def record_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            entry = _entry(scope, status["code"])
            if entry is not None:
                await run_in_threadpool(self._write, entry)

    def _write(self, entry: AuditEntry) -> None:
        try:
            with self.db.session() as session:
                record(session, entry)
        except Exception as exc:  # the request is done; losing an audit row must be loud
            log.error("could not write the audit log (%s %s): %s", entry.action,
                      entry.object_id, exc)


def _entry(scope: Scope, status_code: int) -> AuditEntry | None:
    state: dict[str, Any] = scope.get("state") or {}
    who: Principal | None = state.get("principal")
    if who is None:
        return None
    route_path = getattr(scope.get("route"), "path", None)
    # Routes are mounted under /v1; the matched route knows its path within the router.
    template = (f"/v1{route_path}" if route_path and not route_path.startswith("/v1")
                else route_path or scope["path"])
    object_id = state.get("audit_object") or _path_object(scope.get("path_params") or {})
    return AuditEntry(tenant_id=who.tenant_id, key_id=who.key_id,
                      action=f"{scope['method']} {template}"[:120],
                      object_id=object_id[:200] if object_id else None, status_code=status_code)


def record(session: Session, entry: AuditEntry) -> int:
    """Insert the entry as its tenant's next row (1, 2, 3 ...); returns that number."""
    columns = ("tenant_id", "key_id", "action", "object_id", "status_code")
    values = {name: getattr(entry, name) for name in columns}
    entry.seq = insert_numbered(session, AuditEntry, "tenant_id", "seq",
                                {**values, "created_at": entry.created_at or utcnow()})
    return entry.seq


def _path_object(params: dict[str, Any]) -> str | None:
    """The object a request acted on, from the matched route's path parameters: the last one
    (in path order), the innermost resource when routes nest."""
    return str(list(params.values())[-1]) if params else None


# One tenant's log (an admin's, or an operator's ?tenant=) pages by its own numbers, so neither
# ids nor cursors say anything of other tenants; an operator's view of every tenant by the
# table's id, which only operators see (in cursors).
TENANT_ORDER = Keyset(AuditEntry.seq, AuditEntry.seq)
ALL_TENANTS_ORDER = Keyset(AuditEntry.id, AuditEntry.id)


def audit_log(session: Session, principal: Principal, *, tenant_id: str | None = None,
              limit: int = DEFAULT_LIMIT, cursor: str | None = None
              ) -> tuple[list[AuditEntry], str | None]:
    """Newest first, a page at a time."""
    one_tenant = not principal.is_operator or tenant_id is not None
    return read_page(session, visible_rows(principal, AuditEntry, tenant_id=tenant_id),
                     TENANT_ORDER if one_tenant else ALL_TENANTS_ORDER, limit=limit,
                     cursor=cursor)


def audit_view(entry: AuditEntry) -> dict:
    """``id`` is the row's number within its tenant's log (operators' own rows: within
    theirs), so a tenant sees 1, 2, 3 ... with no gaps that others made."""
    return {"id": entry.seq, "tenant_id": entry.tenant_id, "key_id": entry.key_id,
            "action": entry.action, "object_id": entry.object_id,
            "status_code": entry.status_code, "created_at": entry.created_at}
