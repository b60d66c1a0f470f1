"""Every list has one shape, {"items", "next_cursor"}, a bounded limit and cursor pages: a
walk through the pages sees every row once, in order, and a page costs the same number of
queries however many rows it holds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest
from sqlalchemy import event

from ftune.processes import wait_until
from ftune.service.auth.principal import LOCAL_USER, Role
from ftune.service.db import migrate
from ftune.service.db.session import Database
from ftune.service.db.tables import DEFAULT_TENANT_ID, EpochMetrics, Job, ModelAlias, TunedModel
from ftune.service.errors import InvalidInput
from ftune.service.jobs import list_jobs
from ftune.service.tuned_models import list_models
from ftune.testing.access import make_key

LISTS = ["/v1/jobs", "/v1/datasets", "/v1/models", "/v1/keys", "/v1/audit", "/v1/backbones"]
# The audit log is walked in a tenant of its own (below): the shared stack's is written to by
# every request, and a row lands just after its response is sent.
SHARED_LISTS = [path for path in LISTS if path != "/v1/audit"]


def _walk(http, path: str, limit: int, rows: int, **query: str) -> list[dict]:
    """The first ``rows`` rows (or all there are), read ``limit`` at a time."""
    items, cursor = [], None
    while len(items) < rows:
        params = {**query, "limit": limit, **({"cursor": cursor} if cursor else {})}
        page = http.get(path, params=params).json()
        assert set(page) == {"items", "next_cursor"} and len(page["items"]) <= limit
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    return items[:rows]


def _key(row: dict) -> str:
    return row.get("id", row.get("name"))


@pytest.mark.parametrize("path", SHARED_LISTS)
def test_every_list_pages_through_its_rows_once_in_order(operator_client, client, tiny_model,
                                                         path):
    for _ in range(3):  # a few keys, so that the list has several rows
        client.post("/v1/keys", json={"name": "paging"})
    first = operator_client.get(path, params={"limit": 1000}).json()["items"][:12]
    assert first
    for limit in (1, 5):
        walked = [_key(row) for row in _walk(operator_client, path, limit, rows=len(first))]
        # The shared stack may add rows (a sweep's job, say) while we walk; they come first in
        # a newest-first list, so the walk must be one contiguous, in-order run of a later read.
        after = [_key(row) for row in
                 operator_client.get(path, params={"limit": 1000}).json()["items"]]
        assert len(walked) == len(first) and walked[0] in after
        start = after.index(walked[0])
        assert walked == after[start:start + len(walked)]
    last_page = operator_client.get(path, params={"limit": 1000}).json()
    if len(last_page["items"]) < 1000:
        assert last_page["next_cursor"] is None


def test_the_audit_log_pages_through_its_rows_once_in_order(api_url, database_of_stack,
                                                            operator_client):
    """A tenant whose log nobody else writes: every walk is exactly that log."""
    tenant = f"paging-{uuid4().hex[:8]}"
    with make_key(database_of_stack, role=Role.ADMIN, tenant=tenant).client(api_url, 60) as http:
        made = [http.post("/v1/keys", json={"name": f"paging-{i}"}).json()["id"]
                for i in range(7)]

        def whole_log() -> list[dict] | None:
            items = http.get("/v1/audit", params={"limit": 1000}).json()["items"]
            return items if len(items) == len(made) else None

        # A request's audit row is written once its response is sent: wait for the last.
        log = wait_until(whole_log, 30, "the audit rows of the keys made")
        # Each key's row, once (in the order written: each lands after its response).
        assert sorted(row["object_id"] for row in log) == sorted(made)
        assert {row["action"] for row in log} == {"POST /v1/keys"}
        ids = [row["id"] for row in log]
        assert ids == sorted(set(ids), reverse=True)  # newest first, each once
        for reader, query in ((http, {}), (operator_client, {"tenant": tenant})):
            for limit in (1, 2, 5, 7, 8):
                walked = _walk(reader, "/v1/audit", limit, rows=1000, **query)
                assert walked == log, (query, limit)


@pytest.mark.parametrize("path", LISTS)
def test_limits_and_cursors_are_checked(client, path):
    for limit in (0, 1001, -1):
        response = client.get(path, params={"limit": limit})
        assert response.status_code == 422 and "limit" in response.json()["detail"]
    for cursor in ("garbage!", "W10", "eyJhIjogMX0", "x" * 500, "WyIyMDI2IiwgMV0"):
        response = client.get(path, params={"cursor": cursor})
        assert response.status_code == 422, (cursor, response.text)
        assert "cursor" in response.json()["detail"]


def _fill(db: Database, jobs: int, name: str) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with db.session() as session:
        for i in range(jobs):
            job = Job(tenant_id=DEFAULT_TENANT_ID, dataset_id="d" * 32, spec={}, epochs=5,
                      status="queued" if i % 2 else "succeeded",
                      created_at=start + timedelta(seconds=i // 3))  # ties on created_at
            session.add(job)
            session.flush()
            session.add_all(EpochMetrics(job_id=job.id, epoch=e, row={"epoch": e})
                            for e in range(1, 6))
            if i % 2 == 0:
                model = TunedModel(tenant_id=DEFAULT_TENANT_ID, name=name, version=i, job_id=job.id,
                                   dataset_id="d" * 32, backbone="b", classes=[], metrics={},
                                   spec={})
                session.add(model)
                session.flush()
                session.add(ModelAlias(tenant_id=DEFAULT_TENANT_ID, name=name, alias=f"a{i}",
                                       model_id=model.id))


def _queries(db: Database, read) -> tuple[int, object]:
    statements: list[str] = []
    listener = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(db.engine, "before_cursor_execute", listener)
    try:
        with db.session() as session:
            result = read(session)
    finally:
        event.remove(db.engine, "before_cursor_execute", listener)
    return len(statements), result


@pytest.mark.parametrize("lister", [list_jobs, list_models])
def test_a_page_costs_the_same_queries_for_few_or_many_rows(tmp_path, lister):
    db = Database(f"sqlite:///{tmp_path / 'ftune.db'}", prepare=migrate.upgrade)
    _fill(db, 4, "few")
    few, (items, _) = _queries(db, lambda s: lister(s, LOCAL_USER, limit=100))
    _fill(db, 60, "many")
    many, (more_items, _) = _queries(db, lambda s: lister(s, LOCAL_USER, limit=100))
    assert len(more_items) > len(items) and few == many <= 3
    assert all("metrics" not in job or isinstance(job["metrics"], dict) for job in more_items)
    # Ties on the sort key are broken by id: a walk sees every row once.
    seen, cursor = [], None
    while True:
        _, (page, cursor) = _queries(db, lambda s, c=cursor: lister(s, LOCAL_USER, limit=7,
                                                                    cursor=c))
        seen += [row["id"] for row in page]
        if cursor is None:
            break
    assert sorted(seen) == sorted({row["id"] for row in more_items}) and len(seen) == len(set(seen))
    with pytest.raises(InvalidInput):
        _queries(db, lambda s: lister(s, LOCAL_USER, limit=5, cursor="bm90IGpzb24"))
    db.dispose()
