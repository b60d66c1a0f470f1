"""The storage interface every blob goes through, whatever the backend.

A blob is written whole or not at all: readers see the finished object or nothing (a local
file is renamed into place; an S3 object appears when its upload completes). Keys are made
by the service from ids and content hashes, never from a user's file name, and are checked
here so that no backend ever builds a path or a URL from anything else.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Lower-case ids and hashes, dots for suffixes, slashes between parts; no part is "." or "..".
_KEY = re.compile(r"[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*")
MAX_KEY_LENGTH = 512
PROBE_KEY = "probes/storage-check"


class BlobError(Exception):
    """The store could not do what was asked (unreachable, refused, a missing object)."""


class BlobMissing(BlobError):
    """No object under the key: never stored, or deleted (often while a request read it;
    the API answers 404 naming what vanished, ``errors.py``)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no object {key}")
        self.key = key


# Each backend adds a test for its own "the store did not answer" errors (workers retry those).
_OUTAGE_TESTS: list[Callable[[BaseException], bool]] = []


def is_store_outage(exc: BaseException) -> bool:
    """The store was unreachable, timed out or overloaded: worth retrying later (a missing or
    corrupt object, a refused credential, is not)."""
    return any(test(exc) for test in _OUTAGE_TESTS)


def add_outage_test(test: Callable[[BaseException], bool]) -> None:
    _OUTAGE_TESTS.append(test)


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    sha256: str | None = None  # known when this process wrote it


def check_key(key: str) -> str:
    """``key`` when it is one the service makes; ValueError otherwise."""
    if len(key) > MAX_KEY_LENGTH or not _KEY.fullmatch(key) or ".." in key.split("/"):
        raise ValueError(f"not a storage key: {key!r}")
    return key


class BlobStore(ABC):
    """What the API and the workers need of a store. Every method checks its key."""

    #: Shown by ``/healthz`` and ``ftune storage check`` (no credentials in it).
    location: str

    def put_chunks(self, key: str, chunks: Iterable[bytes]) -> BlobInfo:
        """Write the object from ``chunks`` as they come (memory stays bounded), visible only
        once all of it is stored; its size and SHA-256. If ``chunks`` raises, no object
        appears and the exception propagates; an S3 multipart upload is aborted (if the
        abort itself fails, or the process dies, the parts wait for the bucket's
        AbortIncompleteMultipartUpload lifecycle rule)."""
        digest = hashlib.sha256()

        def hashed() -> Iterator[bytes]:
            for chunk in chunks:
                digest.update(chunk)
                yield chunk

        size = self._write(check_key(key), hashed())
        return BlobInfo(key, size, digest.hexdigest())

    @abstractmethod
    def _write(self, key: str, chunks: Iterable[bytes]) -> int:
        """The backend's whole-or-nothing write (see ``put_chunks``); the bytes written."""

    @abstractmethod
    def read_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes in pieces; BlobMissing when there is none."""

    @abstractmethod
    def info(self, key: str) -> BlobInfo | None:
        """The object's size, or None when there is none."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; nothing happens when there is none."""

    @abstractmethod
    def keys(self, prefix: str) -> Iterator[str]:
        """Every key under ``prefix`` (a key or a key followed by "/")."""

    def presigned_url(self, key: str, *, filename: str, ttl_s: int) -> str | None:
        """A URL that downloads the object as ``filename`` without credentials for
        ``ttl_s`` seconds; None where the backend has none (a local folder)."""
        return None

    def put_file(self, key: str, path: Path, chunk_size: int = 8 << 20) -> BlobInfo:
        with path.open("rb") as source:
            return self.put_chunks(key, iter(lambda: source.read(chunk_size), b""))

    def read(self, key: str) -> bytes:
        """A small object whole (probes, metadata); stream anything large."""
        return b"".join(self.read_chunks(key))

    def download(self, key: str, path: Path) -> int:
        """Copy the object to ``path``, written whole (a temporary name, then renamed)."""
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
        size = 0
        try:
            with partial.open("wb") as out:
                for chunk in self.read_chunks(key):
                    out.write(chunk)
                    size += len(chunk)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        return size

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix``; how many."""
        doomed = list(self.keys(prefix))
        for key in doomed:
            self.delete(key)
        return len(doomed)

    def reachable(self) -> str:
        """"ok", or "down: why" (one cheap request: what ``/healthz`` reports)."""
        try:
            # A listing, not a HEAD: a HEAD cannot tell a missing bucket from a missing key.
            next(iter(self.keys(PROBE_KEY.split("/")[0])), None)
        except Exception as exc:  # every backend's own errors; the type only (a public page)
            return f"down: {type(exc).__name__}"
        return "ok"

    def check(self) -> None:
        """Write, read back and delete a probe; BlobError naming what failed."""
        payload = b"ftune storage check"
        try:
            self.put_chunks(PROBE_KEY, [payload])
            if self.read(PROBE_KEY) != payload:
                raise BlobError(f"{self.location}: the probe read back different bytes")
            self.delete(PROBE_KEY)
        except BlobError:
            raise
        except Exception as exc:  # every backend's own errors, named for the operator
            raise BlobError(f"{self.location}: {type(exc).__name__}: {exc}") from exc


class StoreHealth:
    """What ``/healthz`` says of the store: at most one cheap request every ``ttl_s``, so a
    store that is down costs neither threads nor billed requests however often it is asked."""

    def __init__(self, store: BlobStore, ttl_s: float = 10.0) -> None:
        self.store, self.ttl_s = store, ttl_s
        self._lock = threading.Lock()
        self._checked_at, self._status = -float("inf"), "ok"

    def status(self) -> str:
        with self._lock:
            if time.monotonic() - self._checked_at >= self.ttl_s:
                self._status = self.store.reachable()
                self._checked_at = time.monotonic()
            return self._status
