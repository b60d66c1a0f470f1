"""Small predict bodies are parsed in memory (no file written, no I/O thread); larger ones
stream to files under the data directory. Both give the same answers."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image
from starlette.requests import Request

from ftune.service.errors import PayloadTooLarge
from ftune.service.ingest.multipart import receive_multipart

BOUNDARY = "b0undary"


def _body(*files: tuple[str, bytes], fields: dict[str, str] | None = None) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
             f"{value}\r\n".encode() for name, value in (fields or {}).items()]
    parts += [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; '
              f'filename="{name}"\r\nContent-Type: image/png\r\n\r\n'.encode() + data + b"\r\n"
              for name, data in files]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def _request(body: bytes) -> Request:
    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)] or [b""]

    async def receive() -> dict:
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    headers = [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
               (b"content-length", str(len(body)).encode())]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers},
                   receive)


def _receive(body: bytes, dest, **limits):
    return asyncio.run(receive_multipart(_request(body), dest=dest, file_fields={"files"},
                                         max_bytes=1 << 30, max_files=8, **limits))


def test_a_body_within_the_memory_bound_is_kept_in_memory(tmp_path):
    body = _body(("a.png", b"A" * 1000), ("b.png", b"B" * 70_000), fields={"top_k": "3"})
    form = _receive(body, tmp_path / "uploads", in_memory_bytes=len(body))
    assert [(f.filename, f.path, bytes(f.data)) for f in form.files] == [
        ("a.png", None, b"A" * 1000), ("b.png", None, b"B" * 70_000)]
    assert form.fields == {"top_k": "3"}
    assert form.files[1].source().read() == b"B" * 70_000
    assert not (tmp_path / "uploads").exists()  # nothing written, not even the folder
    form.cleanup()


def test_a_body_over_the_memory_bound_streams_to_files(tmp_path):
    body = _body(("a.png", b"A" * 1000), ("b.png", b"B" * 70_000))
    form = _receive(body, tmp_path / "uploads", in_memory_bytes=len(body) - 1)
    assert [f.written.read_bytes() for f in form.files] == [b"A" * 1000, b"B" * 70_000]
    assert all(f.written.parent == tmp_path / "uploads" for f in form.files)
    form.cleanup()
    assert list((tmp_path / "uploads").iterdir()) == []


def test_the_per_file_limit_holds_in_memory_too(tmp_path):
    body = _body(("ok.png", b"x" * 100), ("huge.png", b"y" * 5000))
    with pytest.raises(PayloadTooLarge, match=r"huge\.png"):
        _receive(body, tmp_path / "uploads", in_memory_bytes=len(body), max_file_bytes=1000)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_predictions_are_the_same_from_memory_and_from_files(client, tiny_model):
    url = f"/v1/models/{tiny_model['id']}/predict"
    small = _png(Image.new("RGB", (40, 40), (200, 30, 60)))
    noise = np.random.default_rng(0).integers(0, 256, (720, 720, 3), dtype=np.uint8)
    big = _png(Image.fromarray(noise))  # incompressible: the body is over 1 MB
    assert len(big) > 1 << 20
    alone = client.post(url, files={"files": ("small.png", small)})  # in memory
    both = client.post(url, files=[("files", ("small.png", small)),
                                   ("files", ("big.png", big))])  # through files
    assert alone.status_code == both.status_code == 200, both.text
    (from_memory,) = alone.json()["predictions"]
    from_files, _ = both.json()["predictions"]
    assert [p["label"] for p in from_memory] == [p["label"] for p in from_files]
    assert np.allclose([p["score"] for p in from_memory], [p["score"] for p in from_files],
                       atol=1e-5)
