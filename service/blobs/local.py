"""Blobs as files under one folder: the embedded default (``make up``, one machine)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from ftune.service.blobs.base import BlobInfo, BlobMissing, BlobStore, check_key


class LocalBlobStore(BlobStore):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = f"file:{root}"

    def reachable(self) -> str:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"down: {type(exc).__name__}"
        return "ok" if os.access(self.root, os.W_OK) else "down: not writable"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write(self, key: str, chunks: Iterable[bytes]) -> int:
        path = self._path(key)
        # Written beside its final name, then renamed: a reader sees all of it or nothing.
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
        size = 0
        try:
            with _create_in_folder(partial) as out:
                for chunk in chunks:
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        return size

    def read_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        path = self._path(key)
        try:
            source = path.open("rb")
        except FileNotFoundError:
            raise BlobMissing(key) from None
        with source:
            yield from iter(lambda: source.read(chunk_size), b"")

    def info(self, key: str) -> BlobInfo | None:
        try:
            return BlobInfo(key, self._path(key).stat().st_size)
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Folders left empty go too (as an S3 prefix does with its last object).
        for folder in path.parents:
            if folder == self.root or not folder.is_relative_to(self.root):
                break
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone already)
                break

    def keys(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix.rstrip("/"))
        if base.is_file():
            yield prefix.rstrip("/")
            return
        # os.walk, not rglob: a folder that a concurrent delete removes is skipped, where
        # rglob raises FileNotFoundError halfway through the listing.
        found = [Path(folder, name) for folder, _, names in os.walk(base) for name in names
                 if not name.startswith(".")]
        for path in sorted(found):
            yield path.relative_to(self.root).as_posix()


def _create_in_folder(path: Path, attempts: int = 20) -> BinaryIO:
    """``path`` opened for writing, its folders made first. A concurrent ``delete`` of the
    last object in that folder removes the folder it leaves empty; made again then."""
    for attempt in range(attempts):
        try:
            # mkdir itself races the delete: a folder it found made (FileExistsError) may be
            # gone before it checks it is one.
            path.parent.mkdir(parents=True, exist_ok=True)
            return path.open("wb")
        except (FileNotFoundError, FileExistsError):
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
