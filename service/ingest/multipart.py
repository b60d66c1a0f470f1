"""Stream a multipart/form-data body straight to files under the data directory.

Starlette's ``request.form()`` spools files to the system temp folder; we parse the stream
ourselves so that the body is never held in memory whole, nothing is written outside the data
directory, and an oversized upload is refused as soon as it is seen. Parsing and writing run
on a small pool of I/O threads, a megabyte at a time, never on the event loop (a slow disk
would stall every request). How long a client may pause is bounded by ``body_limits``.

A route may keep small bodies in memory instead (``in_memory_bytes``: predictions): a body
that declares at most that many bytes is parsed on the event loop when it has arrived (about
as long as a thread hop costs, for a megabyte), and nothing is written.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from python_multipart.multipart import MultipartParser, parse_options_header

if TYPE_CHECKING:  # the library defines its callback types for type checkers only
    from python_multipart.multipart import MultipartCallbacks
from starlette.requests import ClientDisconnect, Request

from ftune.service.errors import (
    InvalidInput,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)

MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 32
PARSE_BATCH_BYTES = 1 << 20  # handed to an I/O thread at once: few hops, little memory
# Uploads parse and write here; more uploads than threads take turns a megabyte at a time.
UPLOAD_IO = ThreadPoolExecutor(max_workers=8, thread_name_prefix="upload-io")


@dataclass
class ReceivedFile:
    field: str
    filename: str
    path: Path | None  # where it was written; None: held in ``data``
    size: int = 0
    data: bytearray = dataclasses.field(default_factory=bytearray)  # (``field`` is ours)

    def source(self) -> Path | IO[bytes]:
        return self.path if self.path is not None else io.BytesIO(self.data)

    @property
    def written(self) -> Path:
        """Its file: every upload not kept in memory has one."""
        if self.path is None:
            raise ValueError(f"{self.filename} was kept in memory, not written")
        return self.path


@dataclass
class ReceivedForm:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[ReceivedFile] = field(default_factory=list)

    def cleanup(self) -> None:
        for received in self.files:
            if received.path is not None:
                received.path.unlink(missing_ok=True)


class _FormBuilder:
    """Callbacks for python-multipart's push parser; writes file parts as they arrive (to
    ``dest``; None: keeps them in memory)."""

    def __init__(self, dest: Path | None, file_fields: set[str], max_files: int,
                 max_file_bytes: int | None = None, file_limit_name: str = "") -> None:
        self.dest, self.file_fields, self.max_files = dest, file_fields, max_files
        self.max_file_bytes, self.file_limit_name = max_file_bytes, file_limit_name
        self.too_many_files: str | None = None
        self.form = ReceivedForm()
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._file: ReceivedFile | None = None
        self._handle: IO[bytes] | None = None
        self._value = bytearray()
        self.error: Exception | None = None

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._add(d, s, e, "field"),
            "on_header_value": lambda d, s, e: self._add(d, s, e, "value"),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _add(self, data: bytes, start: int, end: int, which: str) -> None:
        if which == "field":
            self._header_field += data[start:end]
        else:
            self._header_value += data[start:end]

    def _part_begin(self) -> None:
        self._headers, self._file, self._handle, self._value = {}, None, None, bytearray()

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise InvalidInput("multipart part without a form-data name")
        self._name = options[b"name"].decode("utf-8", "replace")
        if b"filename" not in options:
            if len(self.form.fields) >= MAX_FIELDS:
                raise InvalidInput(f"too many form fields: at most {MAX_FIELDS}")
            return
        if self._name not in self.file_fields:
            raise InvalidInput(f"unexpected file field {self._name!r}; "
                               f"expected {', '.join(sorted(self.file_fields))}")
        if len(self.form.files) >= self.max_files:
            raise InvalidInput(self.too_many_files or
                               f"{self._name}: too many files, at most {self.max_files} per "
                               "request")
        # The client's file name is kept for messages only; the stored name is ours.
        filename = options[b"filename"].decode("utf-8", "replace")
        path = None if self.dest is None else self.dest / f"{uuid.uuid4().hex}.part"
        self._file = ReceivedFile(self._name, filename, path)
        self.form.files.append(self._file)
        if path is not None:
            self._handle = open(path, "xb")  # noqa: SIM115 - closed in _part_end or close()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.size += end - start
            if self.max_file_bytes is not None and self._file.size > self.max_file_bytes:
                raise PayloadTooLarge(f"{self._file.filename}: larger than the limit of "
                                      f"{self.max_file_bytes} bytes per file "
                                      f"({self.file_limit_name})")
            if self._handle is not None:
                self._handle.write(data[start:end])
            else:
                self._file.data += data[start:end]
            return
        self._value += data[start:end]
        if len(self._value) > MAX_FIELD_BYTES:
            raise InvalidInput(f"form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes")

    def _part_end(self) -> None:
        if self._file is not None:
            self.close()
            self._file = None
        elif self._name:
            self.form.fields[self._name] = self._value.decode("utf-8", "replace")

    @property
    def part_open(self) -> bool:
        return self._file is not None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def upload_too_large(max_bytes: int) -> ServiceError:
    return PayloadTooLarge(f"upload exceeds the limit of {max_bytes} bytes "
                           "(FTUNE_MAX_UPLOAD_MB)")


async def receive_multipart(request: Request, *, dest: Path, file_fields: set[str],
                            max_bytes: int, max_files: int = 1, too_many_files: str | None = None,
                            over_limit: Callable[[int], ServiceError] = upload_too_large,
                            max_file_bytes: int | None = None, file_limit_name: str = "",
                            in_memory_bytes: int = 0) -> ReceivedForm:
    """Parse the request body; files go to ``dest``, or stay in memory where the body
    declares at most ``in_memory_bytes``. On any error nothing is left behind.

    A body over ``max_bytes`` is refused from its Content-Length, or as soon as the streamed
    bytes pass it, with ``over_limit(max_bytes)``."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise UnsupportedMediaType("send the upload as multipart/form-data "
                                   f"(got {content_type.decode('latin-1') or 'no content type'})")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise over_limit(max_bytes)
    in_memory = bool(declared and declared.isdigit() and int(declared) <= in_memory_bytes)
    if in_memory:  # the server stops a body at its declared length: bounded
        max_bytes = min(max_bytes, in_memory_bytes)
    else:
        dest.mkdir(parents=True, exist_ok=True)
    builder = _FormBuilder(None if in_memory else dest, file_fields, max_files, max_file_bytes,
                           file_limit_name)
    builder.too_many_files = too_many_files
    parser = MultipartParser(params[b"boundary"], builder.callbacks())
    received, pending = 0, bytearray()
    work: Future | None = None  # the I/O thread's current batch
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise over_limit(max_bytes)
            pending += chunk
            if len(pending) >= PARSE_BATCH_BYTES and not in_memory:
                work = UPLOAD_IO.submit(parser.write, bytes(pending))
                await asyncio.wrap_future(work)
                pending.clear()
        if in_memory:
            _finish(parser, bytes(pending))
        else:
            work = UPLOAD_IO.submit(_finish, parser, bytes(pending))
            await asyncio.wrap_future(work)
        if builder.part_open:
            raise InvalidInput("incomplete multipart body: the final boundary is missing")
    except BaseException as exc:
        _discard_after(work, builder)
        if isinstance(exc, ClientDisconnect):
            raise InvalidInput("the client disconnected before the upload finished") from exc
        if isinstance(exc, ServiceError):
            raise
        if isinstance(exc, Exception) and type(exc).__module__.startswith("python_multipart"):
            raise InvalidInput(f"malformed multipart body: {exc}") from exc
        raise
    builder.close()
    return builder.form


def _discard_after(work: Future | None, builder: _FormBuilder) -> None:
    """Remove what was written, once the I/O thread is done with its batch: a cancelled
    request must not leave a file that the thread creates after the cleanup."""
    def discard(_: object = None) -> None:
        builder.close()
        builder.form.cleanup()

    if work is None or work.done():
        discard()
    else:
        work.add_done_callback(discard)


def _finish(parser: MultipartParser, rest: bytes) -> None:
    parser.write(rest)
    parser.finalize()
