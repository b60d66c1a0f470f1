"""Folders as single objects: a folder is stored as one uncompressed tar (images and weights
do not compress), streamed while it is written so memory stays bounded, and unpacked with
tarfile's ``data`` filter (no links out, no devices, no absolute paths) even though only the
service writes these tars: the store is another machine, and a host trusts nothing it reads."""

from __future__ import annotations

import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20
# Every member gets this time (2000-01-01), so the same files always make the same tar; not 0:
# zip (a model's download) cannot hold a file dated before 1980.
FIXED_MTIME = 946684800


def tar_chunks(folder: Path) -> Iterator[bytes]:
    """The folder as a tar, in chunks, made by a thread writing into a pipe. Entries are in
    sorted order with no owner and one fixed time, so the same files give the same bytes
    (and hash)."""
    read_end, write_end = os.pipe()
    failure: list[BaseException] = []

    def write() -> None:
        try:
            with os.fdopen(write_end, "wb", buffering=CHUNK) as sink, \
                    tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for path in sorted(folder.rglob("*")):
                    if path.is_file() and not path.is_symlink():
                        _add(tar, path, path.relative_to(folder).as_posix())
        except BaseException as exc:  # the reader raises it once the pipe closes
            failure.append(exc)

    writer = threading.Thread(target=write, name="tar-writer", daemon=True)
    writer.start()
    try:
        with os.fdopen(read_end, "rb", buffering=0) as source:
            while chunk := source.read(CHUNK):
                yield chunk
    finally:
        writer.join()
    if failure:
        raise failure[0]


def _add(tar: tarfile.TarFile, path: Path, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = path.stat().st_size, 0o644, FIXED_MTIME
    with path.open("rb") as source:
        tar.addfile(info, source)


def untar(archive: Path, dest: Path) -> None:
    """Unpack a tar made by ``tar_chunks`` into ``dest`` (which exists)."""
    with tarfile.open(archive, mode="r:") as tar:
        tar.extractall(dest, filter=_private_data)


def _private_data(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """The ``data`` filter, and the owner's bits only: members say 0644 (for a stable hash),
    but what a host unpacks is its own cache, private like the rest of its data directory."""
    member = tarfile.data_filter(member, dest)
    return member if member.mode is None else member.replace(mode=member.mode & 0o700,
                                                             deep=False)
