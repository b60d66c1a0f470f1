"""Rate limits with Redis unreachable: requests are let through unchecked (fail open), and
/metrics counts each one, so an operator can alert on it."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from ftune.processes import free_port
from ftune.service.app import create_app
from ftune.service.settings import Settings
from ftune.testing.archives import zip_folder


def _unenforced(http: TestClient, limit: str) -> float:
    metrics = http.get("/metrics")
    assert metrics.status_code == 200, metrics.text
    found = re.search(rf'^ftune_rate_limit_unenforced_total{{limit="{limit}"}} (\S+)$',
                      metrics.text, re.MULTILINE)
    assert found, metrics.text
    return float(found.group(1))


def test_uploads_over_the_rate_pass_while_redis_is_down_and_are_counted(tmp_path, tiny_folder):
    # A port nothing listens on: Redis refuses every connection at once.
    settings = Settings(home=tmp_path / "home", redis_url=f"redis://127.0.0.1:{free_port()}/0",
                        auth="off", rate_uploads="1/minute")
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as http:
        assert _unenforced(http, "uploads") == 0 and _unenforced(http, "predictions") == 0
        archive = zip_folder(tiny_folder)
        for _ in range(2):  # twice the rate: Redis would have refused the second (429)
            response = http.post("/v1/datasets", files={"file": ("t.zip", archive)},
                                 params={"dedupe": "false"})
            assert response.status_code == 201, response.text
        assert _unenforced(http, "uploads") == 2
        assert _unenforced(http, "jobs") == 0
