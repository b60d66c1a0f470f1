"""Requests racing for a tenant's last quota, on SQLite and on PostgreSQL: exactly what fits
is made, the others get 429 naming the quota, usage never passes the limit, and a refused
upload leaves nothing stored.

The uploads truly overlap: each request's body pauses after its first bytes until every
request has been let in, so all of them pass the check made before the body streams and
meet at insert, where the tenant's lock decides."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ftune.processes import Stack
from ftune.service.auth.principal import Role
from ftune.testing.access import make_key
from ftune.testing.archives import zip_folder
from ftune.testing.postgres import fresh_database
from tests.service.conftest import FAST_LIFECYCLE

GB = 2**30
LET_IN_S = 2.0  # long enough for every request's headers to be handled
BOUNDARY = "race-boundary"


@dataclass
class Target:
    """An API to race against, an operator client of it, and its data directory."""

    api_url: str
    operator: httpx.Client
    home: Path


@pytest.fixture(scope="module")
def pg_target(postgres_server, redis_url, tmp_path_factory) -> Iterator[Target]:
    home = tmp_path_factory.mktemp("race-pg-home")
    broker = redis_url.rsplit("/", 1)[0] + "/6"  # queues of its own
    with fresh_database(postgres_server) as url, Stack(
            home, env={**FAST_LIFECYCLE, "DATABASE_URL": url}, redis_url=broker,
            log_dir=home) as stack:
        api_url = stack.start_api()
        with make_key(url, role=Role.OPERATOR).client(api_url, timeout=120) as operator:
            yield Target(api_url, operator, home)


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, api_url, operator_client, service_home) -> Target:
    if request.param == "sqlite":
        return Target(api_url, operator_client, service_home)
    return request.getfixturevalue("pg_target")


def _team(target: Target, **quotas: float) -> httpx.Client:
    """An admin client of a new tenant with these quotas."""
    name = f"race-{uuid.uuid4().hex[:10]}"
    made = target.operator.post("/v1/tenants", json={"name": name, "quotas": quotas})
    assert made.status_code == 201, made.text
    key = target.operator.post("/v1/keys", json={"name": "admin", "role": "admin",
                                                  "tenant": name}).json()["key"]
    return httpx.Client(base_url=target.api_url, timeout=120,
                        headers={"Authorization": f"Bearer {key}"})


def _form(archive: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"t.zip\"\r\nContent-Type: application/zip\r\n\r\n").encode() + (
        archive + f"\r\n--{BOUNDARY}--\r\n".encode())


def _race_uploads(http: httpx.Client, archive: bytes, n: int) -> list[httpx.Response]:
    """``n`` uploads of ``archive`` at once (no deduplication)."""
    body, go = _form(archive), threading.Event()

    def upload() -> httpx.Response:
        def chunks() -> Iterator[bytes]:
            yield body[:64]
            go.wait(60)  # held until every request has been let in
            yield body[64:]

        return http.post("/v1/datasets", params={"dedupe": "false"}, content=chunks(),
                         headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                                  "Content-Length": str(len(body))})

    with ThreadPoolExecutor(n) as pool:
        sent = [pool.submit(upload) for _ in range(n)]
        time.sleep(LET_IN_S)
        go.set()
        return [future.result() for future in sent]


def _stored(home: Path) -> set[str]:
    """Every dataset in the store, what is being unpacked, and partial uploads."""
    return ({p.parent.name for p in (home / "blobs" / "datasets").glob("*/*")}
            | {p.name for p in (home / "datasets").glob("*")}
            | {p.name for p in (home / "uploads").glob("*")})


def _codes(responses: list[httpx.Response]) -> list[int]:
    return sorted(r.status_code for r in responses)


def test_racing_uploads_make_one_dataset_when_one_fits(target, tiny_folder):
    before = _stored(target.home)
    with _team(target, datasets=1) as team:
        responses = _race_uploads(team, zip_folder(tiny_folder), 3)
        assert _codes(responses) == [201, 429, 429], [r.text for r in responses]
        for refused in (r for r in responses if r.status_code == 429):
            assert "quota datasets exceeded: 1 datasets of 1" in refused.json()["detail"]
        usage = team.get("/v1/usage").json()
        assert usage["usage"]["datasets"] == usage["limits"]["datasets"] == 1
        made = next(r.json()["id"] for r in responses if r.status_code == 201)
        assert [d["id"] for d in team.get("/v1/datasets").json()["items"]] == [made]
    assert _stored(target.home) - before == {made}


def test_racing_uploads_store_only_the_bytes_that_fit(target, tiny_folder):
    size = sum(p.stat().st_size for p in tiny_folder.rglob("*.png"))  # one dataset's bytes
    before = _stored(target.home)
    with _team(target, datasets=10, stored_gb=2.5 * size / GB) as team:
        responses = _race_uploads(team, zip_folder(tiny_folder), 4)
        assert _codes(responses) == [201, 201, 429, 429], [r.text for r in responses]
        for refused in (r for r in responses if r.status_code == 429):
            assert "quota stored_gb exceeded" in refused.json()["detail"]
        usage = team.get("/v1/usage").json()
        assert usage["usage"]["stored_bytes"] == 2 * size <= usage["limits"]["stored_bytes"]
        made = {r.json()["id"] for r in responses if r.status_code == 201}
        assert {d["id"] for d in team.get("/v1/datasets").json()["items"]} == made
    assert _stored(target.home) - before == made


def test_racing_key_requests_make_only_the_keys_allowed(target):
    with _team(target, keys=3) as team:  # its admin key is one of the three
        with ThreadPoolExecutor(5) as pool:
            responses = list(pool.map(lambda i: team.post("/v1/keys", json={"name": f"k{i}"}),
                                      range(5)))
        assert _codes(responses) == [201, 201, 429, 429, 429], [r.text for r in responses]
        for refused in (r for r in responses if r.status_code == 429):
            assert "quota keys exceeded: 3 keys of 3" in refused.json()["detail"]
        keys = team.get("/v1/keys").json()["items"]
        assert len(keys) == 3 == team.get("/v1/usage").json()["usage"]["keys"]
