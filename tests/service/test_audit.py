"""The audit log names the object of every state-changing route: a created object's id as its
handler names it, otherwise the route's own path parameter (sweep cancel and promote were
once audited with no object, as their parameter was missing from a hand-kept list). Ids count
1, 2, 3 ... within a tenant's log, so they reveal nothing of other tenants."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import select

from ftune.service.app import TRAINING_ROUTES
from ftune.service.audit import STATE_CHANGING, AuditMiddleware, _entry
from ftune.service.auth.principal import Principal, Role
from ftune.service.db import migrate
from ftune.service.db.session import Database
from ftune.service.db.tables import AuditEntry

WHO = Principal(Role.ADMIN, "t" * 32, "k" * 32)


def _state_changing_routes_with_ids() -> list[tuple[str, APIRoute]]:
    found = []
    for module in TRAINING_ROUTES:
        for route in module.router.routes:
            if isinstance(route, APIRoute) and route.param_convertors:
                found += [(method, route) for method in sorted(route.methods & STATE_CHANGING)]
    return found


ROUTES = _state_changing_routes_with_ids()


def test_the_sweep_routes_are_among_those_checked():
    checked = {f"{method} {route.path}" for method, route in ROUTES}
    assert {"POST /sweeps/{sweep_id}/cancel", "POST /sweeps/{sweep_id}/promote"} <= checked


@pytest.mark.parametrize(("method", "route"), ROUTES,
                         ids=[f"{m} {r.path}" for m, r in ROUTES])
def test_every_route_with_an_id_in_its_path_is_audited_with_that_id(method, route):
    params = {name: f"{name}-value" for name in route.param_convertors}
    scope = {"type": "http", "method": method, "path": "/v1" + route.path, "route": route,
             "path_params": params, "state": {"principal": WHO}}
    entry = _entry(scope, 404)
    assert entry is not None
    assert entry.object_id == list(params.values())[-1], route.path
    assert entry.action == f"{method} /v1{route.path}"


def test_the_middleware_reads_the_matched_route_after_the_handler_ran(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'ftune.db'}", prepare=migrate.upgrade)

    router = APIRouter()

    @router.post("/things/{thing_id}/cancel")
    def cancel(thing_id: str, request: Request) -> dict:
        request.state.principal = WHO
        return {}

    @router.post("/things")
    def create(request: Request) -> dict:
        request.state.principal = WHO
        request.state.audit_object = "made"
        return {}

    app = FastAPI()
    app.include_router(router, prefix="/v1")
    app.add_middleware(AuditMiddleware, db=db)
    try:
        with TestClient(app) as http:
            assert http.post("/v1/things/abc/cancel").status_code == 200
            assert http.post("/v1/things").status_code == 200
        with db.session() as session:
            entries = list(session.scalars(select(AuditEntry).order_by(AuditEntry.id)))
    finally:
        db.dispose()
    assert [(e.seq, e.action, e.object_id, e.status_code) for e in entries] == [
        (1, "POST /v1/things/{thing_id}/cancel", "abc", 200), (2, "POST /v1/things", "made", 200)]


def test_audit_ids_of_one_tenant_show_no_gaps_made_by_another(client, client_b,
                                                               operator_client):
    """Both tenants act in turn; each one's log is numbered 1..n, newest first, page after
    page, and so is an operator's view of one tenant."""
    for _ in range(3):
        for http in (client, client_b):  # 404s are audited too: no object needed
            assert http.post("/v1/jobs/" + "0" * 32 + "/cancel").status_code == 404
    for http in (client, client_b):
        ids = _all_ids(http, {})
        assert ids == list(range(len(ids), 0, -1)) and len(ids) >= 3, ids
    tenant_b = client_b.get("/v1/audit", params={"limit": 1}).json()["items"][0]["tenant_id"]
    ids = _all_ids(operator_client, {"tenant": tenant_b})
    assert ids == list(range(len(ids), 0, -1))


def _all_ids(http, params: dict) -> list[int]:
    """Every id of the log, two rows a page, following next_cursor."""
    ids: list[int] = []
    cursor = None
    while True:
        page = http.get("/v1/audit", params={**params, "limit": 2,
                                             **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        ids += [row["id"] for row in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return ids
