"""Clients that send slowly or send too much hold nothing for long: headers that never finish
and bodies that stall are cut off (the stack runs with 3 s limits), partial uploads are
removed, and bodies that are not uploads are capped."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import pytest


def _connect(api_url: str) -> socket.socket:
    parts = urlsplit(api_url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=20)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset, when it closed
    with our bytes unread, is a close too)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def _partial_files(service_home) -> list:
    return sorted((service_home / "uploads").glob("*.part"))


def test_headers_that_never_finish_are_cut_off(api_url):
    with _connect(api_url) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        try:
            for _ in range(3):  # a byte now and then keeps no connection alive
                time.sleep(1)
                sock.sendall(b"X")
        except (BrokenPipeError, ConnectionResetError):
            pass  # already cut off
        assert _read_all(sock) == b""
        assert time.monotonic() - started < 15


def test_an_idle_connection_is_closed_after_its_response(api_url):
    with _connect(api_url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reply = _read_all(sock)  # the response, then the keep-alive timeout closes it
        assert reply.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("stall_after", ["headers", "part of the file"])
def test_a_stalled_upload_gets_408_and_leaves_no_partial_file(api_url, access, service_home,
                                                              stall_after):
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"slow.zip\"\r\nContent-Type: application/zip\r\n\r\n").encode()
    body_start = head + b"PK\x03\x04" + b"\0" * 200_000 if stall_after != "headers" else b""
    before = _partial_files(service_home)
    with _connect(api_url) as sock:
        sock.sendall((f"POST /v1/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      f"Authorization: Bearer {access['a-admin'].key}\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      f"Content-Length: 5000000\r\n\r\n").encode() + body_start)
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"FTUNE_UPLOAD_IDLE_TIMEOUT_S" in reply
    assert _partial_files(service_home) == before


def test_a_body_that_is_not_an_upload_is_capped(client):
    spec = {"dataset_id": "0" * 32, "spec": {"epochs": 1}, "padding": "x" * (2 << 20)}
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 413
    assert "multipart/form-data" in response.json()["detail"]
    # Streamed without a length, it is cut off as soon as it passes the cap.
    chunks = (b"{" if i == 0 else b" " * 65536 for i in range(40))
    response = client.post("/v1/jobs", content=chunks,
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 413
