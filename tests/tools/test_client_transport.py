"""The client's retries, idempotency keys and event-stream resumption, against a small real
HTTP server whose answers each test scripts (a live API cannot be made to answer 503 on cue)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from ftune.client import ApiError, Client, FtuneError
from ftune.client.events import follow

Reply = tuple[int, dict, bytes]


@pytest.fixture
def scripted() -> Iterator[Callable[[list[Reply]], tuple[str, list[dict]]]]:
    servers = []

    def start(replies: list[Reply]) -> tuple[str, list[dict]]:
        seen: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                seen.append({"method": self.command, "path": self.path, "body": body,
                             "headers": dict(self.headers), "at": time.monotonic()})
                status, headers, body = replies.pop(0)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *_: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", seen

    yield start
    for server in servers:
        server.shutdown()


def _json(status: int, body: dict, **headers: str) -> Reply:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(body).encode()


JOB = {"id": "j1", "status": "queued", "dataset_id": "d1", "progress": {}}


def test_503_and_429_are_retried_after_retry_after_with_the_same_idempotency_key(scripted):
    url, seen = scripted([_json(503, {"detail": "queue unreachable"}, **{"Retry-After": "1"}),
                          _json(429, {"detail": "slow down"}, **{"Retry-After": "0"}),
                          _json(202, JOB)])
    with Client(url, "k") as client:
        job = client.jobs.create("d1", {"preset": "fast"})
    assert job.id == "j1" and len(seen) == 3
    keys = {request["headers"]["Idempotency-Key"] for request in seen}
    assert len(keys) == 1 and len(next(iter(keys))) >= 16  # one key, sent every time
    assert seen[1]["at"] - seen[0]["at"] >= 0.95  # Retry-After: 1 was honoured
    assert seen[0]["headers"]["Authorization"] == "Bearer k"


def test_each_post_gets_its_own_key_and_errors_carry_the_detail(scripted):
    url, seen = scripted([_json(202, JOB), _json(202, JOB),
                          _json(422, {"detail": "invalid spec", "errors": [
                              {"loc": ["spec", "epochs"], "msg": "must be >= 1",
                               "type": "value_error"}]})])
    with Client(url, "k", retries=0) as client:
        client.jobs.create("d1")
        client.jobs.create("d1")
        with pytest.raises(ApiError) as error:
            client.jobs.create("d1", epochs=0)
    assert seen[0]["headers"]["Idempotency-Key"] != seen[1]["headers"]["Idempotency-Key"]
    assert error.value.status == 422 and error.value.detail == "invalid spec"
    assert error.value.errors[0]["loc"] == ["spec", "epochs"]
    assert "POST /jobs: 422 invalid spec" in str(error.value)


def test_spec_keywords_are_sent_inside_the_spec_and_job_options_beside_it(scripted):
    url, seen = scripted([_json(202, JOB)])
    with Client(url, "k") as client:
        client.jobs.create("d1", {"epochs": 2}, preset="fast", optimizer__lr=0.01,
                           model_name="flowers", max_runtime_s=600)
    assert json.loads(seen[0]["body"]) == {
        "dataset_id": "d1", "priority": 5, "model_name": "flowers", "max_runtime_s": 600,
        "spec": {"epochs": 2, "preset": "fast", "optimizer": {"lr": 0.01}}}


def test_a_model_name_is_quoted_in_the_path(scripted):
    url, seen = scripted([_json(200, {"id": "m1", "name": "my flowers", "version": 2,
                                      "classes": ["a"]})])
    with Client(url, "k") as client:
        client.models.get("my flowers")
    assert seen[0]["path"] == "/v1/models/my%20flowers"


def test_retries_give_up_with_the_last_answer(scripted):
    url, seen = scripted([_json(503, {"detail": "busy"}, **{"Retry-After": "0"})] * 3)
    with Client(url, "k", retries=2) as client, pytest.raises(ApiError, match="busy"):
        client.datasets.get("d1")
    assert len(seen) == 3


def _sse(*events: tuple[int, str, dict]) -> Reply:
    body = "retry: 10\n\n" + "".join(f"id: {i}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"
                                     for i, kind, data in events)
    return 200, {"Content-Type": "text/event-stream"}, body.encode()


def test_a_dropped_event_stream_resumes_from_the_last_event_id(scripted):
    url, seen = scripted([
        _sse((1, "status", {"status": "running"}), (2, "epoch", {"epoch": 1})),
        _json(200, {**JOB, "status": "running"}),  # the stream ended: is the job over?
        _sse((3, "status", {"status": "succeeded"}))])
    with Client(url, "k") as client:
        events = list(follow(client._transport, "j1"))
    assert [(e.id, e.kind) for e in events] == [(1, "status"), (2, "epoch"), (3, "status")]
    streams = [r for r in seen if r["path"].endswith("/events")]
    assert [r["headers"]["Last-Event-ID"] for r in streams] == ["0", "2"]


def test_a_stream_that_ends_after_the_job_did_stops(scripted):
    url, _ = scripted([_sse((5, "epoch", {"epoch": 3})), _json(200, {**JOB, "status": "failed"})])
    with Client(url, "k") as client:
        assert [e.id for e in follow(client._transport, "j1", last_event_id=4)] == [5]


def _closed_port() -> int:
    """A port nothing listens on: bound, then closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_closed_port_fails_fast_naming_the_address():
    url = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with Client(url, "k") as client, pytest.raises(FtuneError) as error:
        client.datasets.get("d1")
    assert time.monotonic() - started < 3  # not the 15 s of retries
    assert url in str(error.value) and "Is the server running? (make up" in str(error.value)


def test_a_refusal_after_the_server_answered_is_retried(scripted):
    # The server has answered once: a refusal now is most likely a restart, so the client
    # waits it out (here: gives up after its retries, having tried each time).
    url, seen = scripted([_json(200, JOB)])
    with Client(url, "k", retries=2, max_wait_s=0.2) as client:
        assert client.jobs.get("j1").id == "j1"
        client._transport.http.close()
        client._transport.http = httpx.Client(base_url=f"http://127.0.0.1:{_closed_port()}/v1")
        started = time.monotonic()
        with pytest.raises(FtuneError, match="Connection refused"):
            client.jobs.get("j1")
    assert time.monotonic() - started >= 0.4  # two waits of max_wait_s: it did retry
    assert len(seen) == 1
