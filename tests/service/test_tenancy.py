"""Sharing the service: every /v1 route needs a key, another tenant's objects are 404, roles
are enforced, keys are revoked at once, quotas and rate limits answer 429, the audit log
records who did what. Real processes, two tenants (team-a, team-b) and an operator."""

from __future__ import annotations

import io
import re
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from PIL import Image

from ftune.processes import Stack, wait_until
from ftune.service.auth.principal import Role
from ftune.service.db.tables import utcnow
from ftune.testing.access import make_key
from ftune.testing.archives import zip_folder
from tests.service.conftest import FAST_LIFECYCLE, wait_for_job

QUICK = {"image_size": 32, "epochs": 1, "batch_size": 12, "preset": "fast"}
SLOW = {"image_size": 64, "epochs": 50, "batch_size": 6, "freeze": {"strategy": "none"},
        "early_stopping": {"patience": 100}}

# Every /v1 route, by the least role that may call it. A new route must be added here (the
# test below compares this table with the app's routes), so none ships without a decision.
MEMBER = {
    "GET /v1/backbones", "GET /v1/datasets", "POST /v1/datasets", "GET /v1/datasets/{dataset_id}",
    "GET /v1/datasets/{dataset_id}/report", "POST /v1/datasets/{dataset_id}/versions",
    "GET /v1/datasets/{dataset_id}/images/{path}",
    "GET /v1/jobs", "POST /v1/jobs",
    "GET /v1/jobs/{job_id}", "POST /v1/jobs/{job_id}/cancel", "GET /v1/jobs/{job_id}/curves.png",
    "GET /v1/jobs/{job_id}/events", "GET /v1/models", "GET /v1/models/{model_ref}",
    "GET /v1/models/{model_ref}/evaluation", "GET /v1/models/{model_ref}/card",
    "GET /v1/models/{model_ref}/confusion.png", "GET /v1/models/{model_ref}/download",
    "GET /v1/models/{model_ref}/reliability.png", "GET /v1/models/{model_ref}/pr_curves.png",
    "GET /v1/models/{model_ref}/worst.png",
    "POST /v1/models/{model_ref}/predict", "POST /v1/models/{model_ref}/suggestions",
    "GET /v1/usage", "GET /v1/sweeps", "POST /v1/sweeps",
    "GET /v1/sweeps/{sweep_id}", "GET /v1/sweeps/{sweep_id}/events",
    "GET /v1/sweeps/{sweep_id}/plot.png", "POST /v1/sweeps/{sweep_id}/cancel",
}
ADMIN = {
    "DELETE /v1/datasets/{dataset_id}", "DELETE /v1/jobs/{job_id}",
    "GET /v1/jobs/{job_id}/logs", "PUT /v1/models/aliases/{alias}", "DELETE /v1/models/{model_ref}",
    "DELETE /v1/models/{model_ref}/exports", "GET /v1/keys", "POST /v1/keys",
    "DELETE /v1/keys/{key_id}", "GET /v1/audit", "POST /v1/sweeps/{sweep_id}/promote",
}
OPERATOR = {
    "GET /v1/tenants", "POST /v1/tenants", "GET /v1/tenants/{tenant_ref}",
    "DELETE /v1/tenants/{tenant_ref}", "PUT /v1/tenants/{tenant_ref}/quotas",
    "GET /v1/tenants/{tenant_ref}/usage",
}


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def b_objects(client_b, tiny_folder) -> dict[str, str]:
    """One of everything in tenant team-b: dataset, finished job, model, alias, key."""
    dataset = client_b.post("/v1/datasets", files={"file": ("t.zip", zip_folder(tiny_folder))},
                            params={"dedupe": "false"})
    assert dataset.status_code == 201, dataset.text
    job = client_b.post("/v1/jobs", json={"dataset_id": dataset.json()["id"], "spec": QUICK})
    done = wait_for_job(client_b, job.json()["id"], timeout_s=180)
    assert done["status"] == "succeeded", done["error"]
    model = client_b.get(f"/v1/models/{done['model_id']}").json()
    assert client_b.put("/v1/models/aliases/prod",
                        json={"model": model["id"]}).status_code == 200
    key = client_b.post("/v1/keys", json={"name": "b's spare"}).json()
    sweep = client_b.post("/v1/sweeps", json={"dataset_id": dataset.json()["id"], "base": QUICK,
                                              "space": {"head.dropout": {"uniform": [0, 0.5]}},
                                              "n_trials": 1})
    assert sweep.status_code == 202, sweep.text
    return {"dataset_id": dataset.json()["id"], "job_id": done["id"], "model_ref": model["id"],
            "model_name": model["name"], "alias": "prod", "key_id": key["id"],
            "tenant_ref": "team-b", "sweep_id": sweep.json()["id"],
            "path": min(p.relative_to(tiny_folder).as_posix() for p in tiny_folder.rglob("*.png"))}


def _routes(http: httpx.Client) -> set[str]:
    paths = http.get("/openapi.json").json()["paths"]
    return {f"{method.upper()} {path}" for path, ops in paths.items() for method in ops
            if path.startswith("/v1/")}


MADE_UP = "0" * 32


def _path_params(route: str) -> list[str]:
    return re.findall(r"{(\w+)}", route)


def _call(http: httpx.Client, route: str, ids: dict[str, str], *, made_up: bool = True,
          **headers: str) -> httpx.Response:
    """Call ``route`` with ``ids`` for its path parameters; where ``ids`` has none, a made-up
    id, unless ``made_up`` is False (then a missing one fails the test)."""
    def id_of(name: str) -> str:
        if name not in ids and not made_up:
            pytest.fail(f"{route}: no real object for {{{name}}}; create one in b_objects")
        return ids.get(name, MADE_UP)

    method, template = route.split(" ", 1)
    path = re.sub(r"{(\w+)}", lambda m: id_of(m[1]), template)
    kwargs: dict = {"headers": headers}
    if route == "POST /v1/models/{model_ref}/predict":
        kwargs["files"] = {"files": ("x.png", _png())}
    elif route == "PUT /v1/models/aliases/{alias}":
        kwargs["json"] = {"model": id_of("model_ref")}
    elif route == "POST /v1/jobs":
        kwargs["json"] = {"dataset_id": ids.get("dataset_id", MADE_UP)}
    elif route in ("POST /v1/datasets/{dataset_id}/versions",
                   "POST /v1/models/{model_ref}/suggestions"):  # a body that passes validation
        kwargs["json"] = {"unlabeled_dataset_id": ids.get("dataset_id", MADE_UP),
                          **({"labels": {"x.png": "a"}} if "versions" in route else {})}
    elif method in ("POST", "PUT") and route != "POST /v1/datasets":
        kwargs["json"] = {}
    if route.endswith("/events"):
        kwargs["timeout"] = 10
    return http.request(method, path, **kwargs)


def test_every_route_is_classified_by_role(client):
    assert _routes(client) == MEMBER | ADMIN | OPERATOR


@pytest.mark.parametrize("route", sorted(MEMBER | ADMIN | OPERATOR))
def test_no_key_or_an_unknown_key_is_401(api_url, route, worker):
    with httpx.Client(base_url=api_url, timeout=30) as anonymous:
        for headers in ({}, {"Authorization": "Bearer ftk_" + "x" * 43},
                        {"Authorization": "Basic dXNlcjpwYXNz"}):
            response = _call(anonymous, route, {}, **headers)
            assert response.status_code == 401, (route, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"


# Every route a tenant may call with an id in its path (the table above is the app's routes,
# so a new route is here too).
ROUTES_WITH_IDS = sorted(r for r in MEMBER | ADMIN if _path_params(r))


def test_every_path_parameter_has_a_real_object_of_another_tenant(client, client_b, b_objects):
    # The app's own routes, not the table: what every id-taking route needs.
    names = {name for route in _routes(client) - OPERATOR for name in _path_params(route)}
    missing = names - set(b_objects)
    assert not missing, f"create an object in b_objects for {sorted(missing)}"
    # Real: team-b itself finds each one.
    assert client_b.get(f"/v1/datasets/{b_objects['dataset_id']}").status_code == 200
    assert client_b.get(f"/v1/jobs/{b_objects['job_id']}").status_code == 200
    assert client_b.get(f"/v1/models/{b_objects['model_ref']}").status_code == 200
    assert client_b.get(f"/v1/models/{b_objects['model_name']}:{b_objects['alias']}"
                        ).status_code == 200
    assert client_b.get(f"/v1/sweeps/{b_objects['sweep_id']}").status_code == 200
    assert b_objects["key_id"] in {k["id"] for k in client_b.get("/v1/keys").json()["items"]}


@pytest.mark.parametrize("route", ROUTES_WITH_IDS)
def test_another_tenants_ids_are_404(client, b_objects, route):
    # An admin of team-a asks for team-b's objects: they do not exist for it. Every path
    # parameter is a real object of team-b's, never a made-up id, which would be a 404
    # whatever the route checked.
    response = _call(client, route, b_objects, made_up=False)
    assert response.status_code == 404, (route, response.status_code, response.text)


@pytest.mark.parametrize("route", sorted(ADMIN | OPERATOR))
def test_a_member_on_admin_routes_is_403(member_client, route):
    response = _call(member_client, route, {})
    assert response.status_code == 403, (route, response.status_code, response.text)


@pytest.mark.parametrize("route", sorted(OPERATOR))
def test_an_admin_on_operator_routes_is_403(client, route):
    assert _call(client, route, {}).status_code == 403


def test_lists_show_the_callers_tenant_only_and_operators_everything(
        client, client_b, operator_client, b_objects):
    for path in ("/v1/datasets", "/v1/jobs", "/v1/models", "/v1/sweeps"):
        a_ids = {item["id"] for item in client.get(path).json()["items"]}
        b_ids = {item["id"] for item in client_b.get(path).json()["items"]}
        everything = {item["id"] for item in operator_client.get(path, params={"limit": 1000})
                      .json()["items"]}
        assert not a_ids & b_ids and b_ids and b_ids <= everything, path
    # Names and aliases resolve within the caller's tenant.
    assert client.get(f"/v1/models/{b_objects['model_name']}:prod").status_code == 404
    assert client_b.get(f"/v1/models/{b_objects['model_name']}:prod").status_code == 200


def test_dedupe_never_reveals_another_tenants_data(client, client_b, tiny_folder, b_objects):
    archive = zip_folder(tiny_folder)  # the same images team-b uploaded
    again_b = client_b.post("/v1/datasets", files={"file": ("t.zip", archive)})
    assert again_b.status_code == 200 and again_b.json()["deduplicated"] is True
    mine = client.post("/v1/datasets", files={"file": ("t.zip", archive)},
                       params={"dedupe": "true"})
    assert mine.status_code in (200, 201)
    assert mine.json()["id"] != b_objects["dataset_id"]
    assert mine.json()["tenant_id"] != again_b.json()["tenant_id"]


def test_keys_are_made_by_admins_shown_once_and_roles_cannot_be_raised(client, member_client):
    made = client.post("/v1/keys", json={"name": "ci", "role": "member"})
    assert made.status_code == 201 and made.json()["key"].startswith("ftk_")
    assert len(made.json()["key"]) >= 4 + 43  # 256 bits, base64
    listed = client.get("/v1/keys").json()["items"]
    assert made.json()["id"] in {k["id"] for k in listed}
    assert all("key" not in k for k in listed)  # never again
    assert client.post("/v1/keys", json={"name": "x", "role": "operator"}).status_code == 403
    assert client.post("/v1/keys", json={"name": "x", "tenant": "team-b"}).status_code == 403
    assert member_client.post("/v1/keys", json={"name": "x"}).status_code == 403


def test_an_expiry_without_a_time_zone_is_read_as_utc(client):
    naive = (utcnow() + timedelta(days=1)).replace(tzinfo=None, microsecond=0)
    made = client.post("/v1/keys", json={"name": "naive", "expires_at": naive.isoformat()})
    assert made.status_code == 201, made.text
    stored = datetime.fromisoformat(made.json()["expires_at"])
    assert stored.replace(tzinfo=stored.tzinfo or UTC) == naive.replace(tzinfo=UTC)
    past = client.post("/v1/keys", json={"name": "naive-past",
                                         "expires_at": "2001-01-01T00:00:00"})
    assert past.status_code == 422 and "expires_at" in past.json()["detail"]


def test_an_expired_key_is_401(api_url, client):
    soon = (utcnow() + timedelta(seconds=1)).isoformat()
    made = client.post("/v1/keys", json={"name": "short-lived", "expires_at": soon}).json()
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {made['key']}"}) \
            as http:
        wait_until(lambda: http.get("/v1/jobs").status_code == 401, 10, "the key to expire")
        assert "expired" in http.get("/v1/jobs").json()["detail"]


def test_priority_above_5_needs_an_admin(client, member_client, tiny_dataset):
    body = {"dataset_id": tiny_dataset["id"], "spec": QUICK, "priority": 9}
    refused = member_client.post("/v1/jobs", json=body)
    assert refused.status_code == 403 and "priority" in refused.json()["detail"]
    accepted = client.post("/v1/jobs", json=body)
    assert accepted.status_code == 202
    client.post(f"/v1/jobs/{accepted.json()['id']}/cancel")


def test_revoking_a_key_takes_effect_at_once_even_on_an_open_event_stream(
        api_url, client, tiny_dataset):
    made = client.post("/v1/keys", json={"name": "to revoke"}).json()
    http = httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {made['key']}"},
                        timeout=httpx.Timeout(60, read=30))
    job = http.post("/v1/jobs", json={"dataset_id": tiny_dataset["id"], "spec": SLOW}).json()
    lines: list[str] = []
    ended = threading.Event()

    def read() -> None:
        with http.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
            for line in response.iter_lines():
                lines.append(line)
        ended.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_until(lambda: any(line.startswith("event: status") for line in lines), 30,
               "the stream to start")
    revoked_at = time.monotonic()
    assert client.delete(f"/v1/keys/{made['id']}").status_code == 204
    assert ended.wait(10), "the event stream did not end after the key was revoked"
    assert time.monotonic() - revoked_at < 5
    assert any("revoked" in line for line in lines if line.startswith("data:"))
    assert http.get("/v1/jobs").status_code == 401
    client.post(f"/v1/jobs/{job['id']}/cancel")
    wait_for_job(client, job["id"], timeout_s=60)


def test_the_audit_log_records_state_changes_per_tenant(client, client_b, member_client,
                                                        operator_client, b_objects):
    mine = client.get("/v1/audit", params={"limit": 1000}).json()["items"]
    theirs = client_b.get("/v1/audit", params={"limit": 1000}).json()["items"]
    assert {e["tenant_id"] for e in mine} == {mine[0]["tenant_id"]}  # one tenant only
    assert {e["tenant_id"] for e in theirs} == {theirs[0]["tenant_id"]} != {mine[0]["tenant_id"]}
    actions = {(e["action"], e["object_id"]) for e in theirs}
    assert ("POST /v1/jobs", b_objects["job_id"]) in actions
    assert ("PUT /v1/models/aliases/{alias}", b_objects["model_ref"]) in actions
    assert ("POST /v1/datasets", b_objects["dataset_id"]) in actions
    assert ("POST /v1/sweeps", b_objects["sweep_id"]) in actions
    assert all(e["key_id"] for e in theirs)
    # A route's object is its path parameter, whatever it is called (sweeps' once had none).
    for action in ("cancel", "promote"):
        assert client.post(f"/v1/sweeps/{b_objects['sweep_id']}/{action}",
                           json={}).status_code == 404
    mine = client.get("/v1/audit", params={"limit": 1000}).json()["items"]
    for action in ("cancel", "promote"):
        assert (f"POST /v1/sweeps/{{sweep_id}}/{action}", b_objects["sweep_id"]) in {
            (e["action"], e["object_id"]) for e in mine}
    assert member_client.get("/v1/audit").status_code == 403
    everyone = operator_client.get("/v1/audit", params={"limit": 1000}).json()["items"]
    # Ids count within a tenant's log: a row is its tenant and id.
    assert ({(e["tenant_id"], e["id"]) for e in theirs}
            <= {(e["tenant_id"], e["id"]) for e in everyone})


def test_hosts_and_origins_of_other_sites_are_refused(api_url, client):
    # DNS rebinding: a name we do not serve.
    assert client.get("/v1/jobs", headers={"Host": "evil.example"}).status_code == 400
    # Loopback's IPv6 name, as a Host header writes it, is served like the others.
    port = api_url.rsplit(":", 1)[1]
    assert client.get("/v1/jobs", headers={"Host": f"[::1]:{port}"}).status_code == 200
    # A web page on another site making the browser POST (Origin header).
    refused = client.post("/v1/jobs/" + "0" * 32 + "/cancel",
                          headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403 and "evil.example" in refused.json()["detail"]
    own = client.post("/v1/jobs/" + "0" * 32 + "/cancel", headers={"Origin": api_url})
    assert own.status_code == 404


def test_auth_cannot_be_turned_off_on_a_public_address(tmp_path):
    import os
    import subprocess

    from ftune.processes import ftune_command

    env = {**os.environ, "FTUNE_AUTH": "off", "REDIS_URL": "redis://127.0.0.1:1/0"}
    result = subprocess.run(ftune_command("api", "--host", "0.0.0.0", "--port", "1",
                                          "--home", str(tmp_path)),
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "FTUNE_AUTH=off" in result.stderr


def test_rate_limits_hold_across_two_api_processes(redis_url, tmp_path, tiny_folder):
    broker = redis_url.rsplit("/", 1)[0] + "/6"  # queues of its own: no worker takes these
    env = {**FAST_LIFECYCLE, "FTUNE_RATE_JOBS": "3/minute", "FTUNE_RATE_UPLOADS": "5/minute"}
    with Stack(tmp_path / "home", env=env, redis_url=broker, log_dir=tmp_path) as stack:
        first = stack.start_api()
        key = make_key(f"sqlite:///{stack.home / 'ftune.db'}", role=Role.ADMIN)
        second = stack.start_api()  # another process: the limits live in Redis
        one, two = key.client(first, timeout=60), key.client(second, timeout=60)
        dataset = one.post("/v1/datasets", files={"file": ("t.zip", zip_folder(tiny_folder))})
        body = {"dataset_id": dataset.json()["id"], "spec": QUICK}
        codes = [http.post("/v1/jobs", json=body).status_code for http in (one, two, one)]
        assert codes == [202, 202, 202]
        limited = two.post("/v1/jobs", json=body)
        assert limited.status_code == 429 and "rate limit" in limited.json()["detail"]
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        other_key = make_key(f"sqlite:///{stack.home / 'ftune.db'}", role=Role.ADMIN)
        assert other_key.client(second).post("/v1/jobs", json=body).status_code == 202


def test_the_openapi_document_declares_the_key(client):
    document = client.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["APIKey"]["scheme"] == "bearer"
    for path, operations in document["paths"].items():
        if path.startswith("/v1/"):
            for method, operation in operations.items():
                assert {"APIKey": []} in operation.get("security", []), (method, path)


def test_healthz_without_a_key_says_only_whether_the_api_is_up(api_url, member_client):
    # A load balancer's probe: the status, the mode and the version, nothing about the
    # components or what the tenants predict.
    bare = httpx.get(f"{api_url}/healthz")
    assert bare.status_code == 200
    assert bare.json() == {"status": "ok", "mode": "api", "version": bare.json()["version"],
                           "auth": "on: every /v1 route needs an API key"}
    # Any valid key sees the rest.
    full = member_client.get("/healthz").json()
    assert full["status"] == "ok" and full["database"] == "ok" and full["redis"] == "ok"
    assert {"storage", "rate_limits", "loaded_models", "predict_images"} <= set(full)
    # A key that is sent must be valid: a probe with a typo'd key is told so.
    wrong = httpx.get(f"{api_url}/healthz", headers={"Authorization": "Bearer ftk_wrong"})
    assert wrong.status_code == 401 and "key" in wrong.json()["detail"]
