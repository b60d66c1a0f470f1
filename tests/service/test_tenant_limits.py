"""Limits per tenant, so that making keys does not multiply what a tenant may hold: keys (429
past it; revoked and expired ones do not count), uploads at once over every API process (429
with Retry-After), event streams (429 with Retry-After); and a cap on uploads, each with its
unpacking child, per API process (503 with Retry-After).

One stack of its own, with small limits and two API processes over one database and Redis.
A slow upload body holds its slots while it streams."""

from __future__ import annotations

import contextlib
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from ftune.processes import Stack, wait_until
from ftune.service.auth.principal import Role
from ftune.service.errors import TooManyRequests
from ftune.service.upload_slots import TenantLeases
from ftune.testing.access import make_key
from ftune.testing.archives import zip_folder
from tests.service.conftest import FAST_LIFECYCLE

LIMITS = {"FTUNE_MAX_KEYS_PER_TENANT": "3", "FTUNE_MAX_UPLOADS_PER_TENANT": "2",
          "FTUNE_MAX_UNPACKS": "3", "FTUNE_MAX_STREAMS_PER_KEY": "2",
          "FTUNE_MAX_STREAMS_PER_TENANT": "3",
          "FTUNE_UPLOAD_IDLE_TIMEOUT_S": "60"}  # slow uploads hold their slots meanwhile
QUICK = {"image_size": 32, "epochs": 1, "batch_size": 12, "preset": "fast"}


@dataclass
class Limited:
    apis: list[str]  # two API processes sharing the database and Redis
    operator: httpx.Client
    redis: redis.Redis


@pytest.fixture(scope="module")
def limited(redis_url, tmp_path_factory) -> Iterator[Limited]:
    home = tmp_path_factory.mktemp("limits-home")
    broker = redis_url.rsplit("/", 1)[0] + "/7"  # queues and leases of its own
    with Stack(home, env={**FAST_LIFECYCLE, **LIMITS}, redis_url=broker,
               log_dir=home) as stack:
        apis = [stack.start_api(), stack.start_api()]
        operator = make_key(f"sqlite:///{home / 'ftune.db'}", role=Role.OPERATOR)
        with operator.client(apis[0], timeout=120) as http:
            yield Limited(apis, http, redis.Redis.from_url(broker))


def _tenant(limited: Limited, **quotas: int) -> tuple[str, str]:
    """A new tenant's id and the key of its admin."""
    name = f"lim-{uuid.uuid4().hex[:10]}"
    made = limited.operator.post("/v1/tenants", json={"name": name, "quotas": quotas})
    assert made.status_code == 201, made.text
    key = limited.operator.post("/v1/keys", json={"name": "admin", "role": "admin",
                                                  "tenant": name})
    assert key.status_code == 201, key.text
    return made.json()["id"], key.json()["key"]


def _client(api: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=api, timeout=120, headers={"Authorization": f"Bearer {key}"})


@contextlib.contextmanager
def _slow_upload(api: str, key: str) -> Iterator[socket.socket]:
    """An upload whose body has only begun: it holds its slots until the socket closes."""
    parts = urlsplit(api)
    head = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"slow.zip\"\r\n"
            b"Content-Type: application/zip\r\n\r\nPK\x03\x04")
    with socket.create_connection((parts.hostname, parts.port), timeout=20) as sock:
        sock.sendall((f"POST /v1/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      f"Authorization: Bearer {key}\r\n"
                      "Content-Type: multipart/form-data; boundary=b\r\n"
                      "Content-Length: 5000000\r\n\r\n").encode() + head)
        yield sock


def _uploading(limited: Limited, tenant_id: str, n: int) -> None:
    """Wait until ``n`` uploads of the tenant hold a slot (their leases in Redis)."""
    wait_until(lambda: limited.redis.zcard(f"ftune:uploads:{tenant_id}") == n, 15,
               f"{n} uploads of {tenant_id} in progress")


def _upload(http: httpx.Client, tiny_folder) -> httpx.Response:
    return http.post("/v1/datasets", files={"file": ("t.zip", zip_folder(tiny_folder))},
                     params={"dedupe": "false"})


def test_a_tenant_holds_a_bounded_number_of_keys(limited):
    _, key = _tenant(limited)
    with _client(limited.apis[0], key) as admin:
        spare = admin.post("/v1/keys", json={"name": "spare"})
        soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
        short = admin.post("/v1/keys", json={"name": "short-lived", "expires_at": soon})
        assert spare.status_code == short.status_code == 201  # 3 of 3, with the admin's
        over = admin.post("/v1/keys", json={"name": "one too many"})
        assert over.status_code == 429
        assert "quota keys exceeded: 3 keys of 3" in over.json()["detail"]
        assert "FTUNE_MAX_KEYS_PER_TENANT" in over.json()["detail"]
        assert admin.delete(f"/v1/keys/{spare.json()['id']}").status_code == 204
        assert admin.post("/v1/keys", json={"name": "after a revoke"}).status_code == 201
        for _ in range(2):  # the short-lived key expires: it no longer counts (a request
            time.sleep(1.25)  # between keeps the connection from the 3 s header timeout)
            admin.get("/v1/usage")
        assert admin.post("/v1/keys", json={"name": "after an expiry"}).status_code == 201
        assert admin.post("/v1/keys", json={"name": "over again"}).status_code == 429


def test_an_operator_raises_a_tenants_key_limit(limited):
    tenant_id, key = _tenant(limited, keys=5)
    with _client(limited.apis[0], key) as admin:
        made = [admin.post("/v1/keys", json={"name": f"k{i}"}).status_code for i in range(5)]
        assert made == [201, 201, 201, 201, 429]
        assert limited.operator.get(f"/v1/tenants/{tenant_id}/usage").json()["usage"][
            "keys"] == 5


def test_a_tenants_uploads_at_once_are_bounded_over_every_api_process(limited, tiny_folder):
    tenant_id, key = _tenant(limited)
    _, other_key = _tenant(limited)
    first, second = limited.apis
    with _slow_upload(first, key) as held, _slow_upload(second, key):
        _uploading(limited, tenant_id, 2)
        with _client(first, key) as team:
            refused = _upload(team, tiny_folder)
            assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
            assert "FTUNE_MAX_UPLOADS_PER_TENANT" in refused.json()["detail"]
            with _client(first, other_key) as other:  # another tenant is not held back
                assert _upload(other, tiny_folder).status_code == 201
            held.close()  # the server sees the body end early and gives the slot back
            _uploading(limited, tenant_id, 1)
            assert _upload(team, tiny_folder).status_code == 201
    _uploading(limited, tenant_id, 0)


def test_an_api_process_caps_the_uploads_it_unpacks(limited, tiny_folder):
    (a_id, a_key), (b_id, b_key), (_, c_key) = (_tenant(limited) for _ in range(3))
    first, second = limited.apis
    with _slow_upload(first, a_key) as held, _slow_upload(first, a_key), \
            _slow_upload(first, b_key):
        _uploading(limited, a_id, 2)
        _uploading(limited, b_id, 1)
        with _client(first, c_key) as on_first, _client(second, c_key) as on_second:
            refused = _upload(on_first, tiny_folder)
            assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
            assert "FTUNE_MAX_UNPACKS" in refused.json()["detail"]
            assert _upload(on_second, tiny_folder).status_code == 201  # its own cap
            held.close()
            _uploading(limited, a_id, 1)
            assert _upload(on_first, tiny_folder).status_code == 201


def test_a_tenants_keys_together_hold_a_bounded_number_of_streams(limited, tiny_folder):
    _, key = _tenant(limited)
    with _client(limited.apis[0], key) as admin:
        dataset = _upload(admin, tiny_folder).json()
        job = admin.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": QUICK}).json()
        other_key = admin.post("/v1/keys", json={"name": "second"}).json()["key"]
    url = f"/v1/jobs/{job['id']}/events"  # queued: no worker runs it, so its stream stays
    with _client(limited.apis[0], key) as one, \
            _client(limited.apis[0], other_key) as two, contextlib.ExitStack() as streams:
        opened = [streams.enter_context(one.stream("GET", url)) for _ in range(2)]
        opened.append(streams.enter_context(two.stream("GET", url)))
        assert [s.status_code for s in opened] == [200, 200, 200]
        refused = two.get(url)  # the key's own cap (2) is not reached, the tenant's (3) is
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
        assert "FTUNE_MAX_STREAMS_PER_TENANT" in refused.json()["detail"]
        with limited.operator.stream("GET", url) as another_tenant:
            assert another_tenant.status_code == 200
        opened[0].close()

        def reopened() -> bool:
            with two.stream("GET", url) as again:
                return again.status_code == 200

        wait_until(reopened, 15, "a freed stream slot")


def test_upload_leases_lapse_and_fail_open(redis_url):
    client = redis.Redis.from_url(redis_url)
    leases, tenant = TenantLeases(client, lease_s=1.0), f"t-{uuid.uuid4().hex}"
    held = [leases.take(tenant, 2), leases.take(tenant, 2)]
    with pytest.raises(TooManyRequests) as full:
        leases.take(tenant, 2)
    assert full.value.status_code == 429 and "Retry-After" in (full.value.headers or {})
    assert held[0] is not None
    leases.release(held[0])
    assert leases.take(tenant, 2) is not None
    time.sleep(1.2)  # holders that stopped renewing (their process died) lapse
    assert leases.take(tenant, 2) is not None and leases.take(tenant, 2) is not None
    unreachable = redis.Redis(port=1, socket_connect_timeout=1, socket_timeout=1)
    assert TenantLeases(unreachable).take(tenant, 2) is None  # not counted: let through
