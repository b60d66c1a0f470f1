"""The same-origin check compares scheme, host and port: a web page served by another program
on this host (another port), or over another scheme, may not make a browser change state here.
Against the real API process of the shared stack."""

from __future__ import annotations

import pytest

from ftune.service.origin import Origin, parse_origin

# Cancelling a job that does not exist: 404 once the origin check lets it through.
CANCEL = "/v1/jobs/" + "0" * 32 + "/cancel"


@pytest.fixture(scope="module")
def port(api_url) -> int:
    return int(api_url.rsplit(":", 1)[1])


def _post(client, origin: str, host: str | None = None):
    headers = {"Origin": origin} | ({"Host": host} if host else {})
    return client.post(CANCEL, headers=headers)


def test_another_port_on_the_same_host_is_refused(client, port):
    other = port + 1 if port < 65535 else port - 1
    for origin in (f"http://localhost:{other}", f"http://127.0.0.1:{other}",
                   "http://localhost", "http://127.0.0.1"):  # the default port, 80
        refused = _post(client, origin)
        assert refused.status_code == 403, (origin, refused.text)
        detail = refused.json()["detail"]
        assert origin in detail and f"this API is http://127.0.0.1:{port}" in detail


def test_another_scheme_is_refused_and_told_about_the_proxy(client, port):
    refused = _post(client, f"https://127.0.0.1:{port}")
    assert refused.status_code == 403
    assert "--forwarded-allow-ips" in refused.json()["detail"]
    assert _post(client, f"ftp://127.0.0.1:{port}").status_code == 403
    # Behind a TLS proxy that uvicorn trusts (127.0.0.1 by default), the page is https.
    proxied = client.post(CANCEL, headers={"Origin": f"https://127.0.0.1:{port}",
                                           "X-Forwarded-Proto": "https",
                                           "Host": "127.0.0.1"})
    assert proxied.status_code == 403  # the proxy's Host has no port: https means 443
    proxied = client.post(CANCEL, headers={"Origin": "https://127.0.0.1",
                                           "X-Forwarded-Proto": "https", "Host": "127.0.0.1"})
    assert proxied.status_code == 404, proxied.text


def test_the_apis_own_origin_and_its_other_names_on_the_same_port_are_accepted(client, port):
    assert _post(client, f"http://127.0.0.1:{port}").status_code == 404
    assert _post(client, f"HTTP://127.0.0.1:{port}").status_code == 404  # case-insensitive
    # localhost is another allowed name of this server: same scheme and port, accepted.
    assert _post(client, f"http://localhost:{port}").status_code == 404
    assert _post(client, f"http://localhost:{port}", host=f"localhost:{port}").status_code == 404


def test_ipv6_loopback_origins_compare_by_port_too(client, port):
    host = f"[::1]:{port}"
    assert _post(client, f"http://[::1]:{port}", host=host).status_code == 404
    refused = _post(client, f"http://[::1]:{port + 1}", host=host)
    assert refused.status_code == 403 and f"this API is http://[::1]:{port}" in refused.text


def test_origins_that_are_not_urls_are_refused_not_errors(client, port):
    for origin in ("null", f"http://127.0.0.1:{port}99999", "http://127.0.0.1:abc", "", "//x"):
        assert _post(client, origin).status_code == 403, origin
    # Safe methods are never refused: a page may link to a download.
    assert client.get("/v1/jobs", headers={"Origin": "http://localhost:1"}).status_code == 200


def test_parse_origin_fills_in_default_ports():
    assert parse_origin("https://Example.org") == Origin("https", "example.org", 443)
    assert parse_origin("http://[::1]:8000") == Origin("http", "::1", 8000)
    assert str(Origin("http", "::1", 8000)) == "http://[::1]:8000"
    assert parse_origin("null") is None and parse_origin("http://x:70000") is None
