"""An API at its limits answers 503 with Retry-After, never 500: here every database
connection of its pool is taken."""

from __future__ import annotations

import contextlib

from fastapi.testclient import TestClient

from ftune.service.app import create_app
from ftune.service.settings import Settings


def test_an_exhausted_connection_pool_is_a_503_with_retry_after(tmp_path):
    app = create_app(Settings(home=tmp_path, auth="off", db_pool_timeout_s=0.5,
                              redis_url="redis://127.0.0.1:1/0"))
    engine = app.state.ctx.db.engine
    with TestClient(app, base_url="http://127.0.0.1") as http:
        assert http.get("/v1/datasets").status_code == 200
        with contextlib.ExitStack() as held:
            for _ in range(engine.pool.size() + engine.pool._max_overflow):
                held.enter_context(engine.connect())
            busy = http.get("/v1/datasets")
            assert busy.status_code == 503, busy.text
            assert int(busy.headers["Retry-After"]) >= 1
            assert "no database connection free" in busy.json()["detail"]
        assert http.get("/v1/datasets").status_code == 200  # and it recovers at once
