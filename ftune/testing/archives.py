"""Build dataset archives (zip, tar, tar.gz) in memory from folders or raw members."""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile
from pathlib import Path
from typing import Literal

# The tar layouts the tests build: plain, gzip, bzip2 and xz (typeshed types tarfile.open by
# these literal modes).
TarMode = Literal["w", "w:gz", "w:bz2", "w:xz"]


def zip_folder(folder: Path, prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(folder).as_posix())
    return buffer.getvalue()


def tar_folder(folder: Path, mode: TarMode = "w:gz", prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.add(path, prefix + path.relative_to(folder).as_posix())
    return buffer.getvalue()


def zip_members(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_with(entries: list[tarfile.TarInfo], data: dict[str, bytes] | None = None,
             mode: TarMode = "w") -> bytes:
    buffer = io.BytesIO()
    data = data or {}
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for info in entries:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
            else:
                archive.addfile(info)
    return buffer.getvalue()


def _empty_entry_name(index: int) -> str:
    """Image names in two class folders: only their size gives them away."""
    return f"c{index % 2}/{index:06d}.png"


def zip_of_empty_files(count: int) -> bytes:
    """A zip of ``count`` empty files named like images (about 100 bytes an entry)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index in range(count):
            archive.writestr(_empty_entry_name(index), b"")
    return buffer.getvalue()


def tar_of_empty_files(count: int, compressed: bool = True) -> bytes:
    """A tar (gzipped unless told) of ``count`` empty files named like images: one 512-byte
    header an entry, which gzip packs into a few bytes. The headers are made from one that
    tarfile wrote, with each name and checksum put in (tarfile itself takes several times
    longer)."""
    template = bytearray(tarfile.TarInfo("x").tobuf(format=tarfile.USTAR_FORMAT))
    template[_NAME] = bytes(_NAME.stop)
    template[_CHECKSUM] = b" " * (_CHECKSUM.stop - _CHECKSUM.start)  # as it is summed
    unnamed = sum(template)
    headers = []
    for index in range(count):
        name = _empty_entry_name(index).encode()
        header = template.copy()
        header[:len(name)] = name
        header[_CHECKSUM.start:_CHECKSUM.stop - 1] = b"%06o\0" % (unnamed + sum(name))
        headers.append(bytes(header))
    raw = b"".join(headers) + bytes(2 * tarfile.BLOCKSIZE)  # the end-of-archive blocks
    return gzip.compress(raw, compresslevel=6) if compressed else raw


_NAME = slice(0, 100)  # of a ustar header
_CHECKSUM = slice(148, 156)


def zip_bomb() -> bytes:
    """100 MB of zeros in one zip entry of about 100 kB."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("cats/zeros.png", b"\0" * (100 << 20))
    return buffer.getvalue()


def tar_gz_bomb() -> bytes:
    """100 MB of zeros in one tar entry, gzipped."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        info = tarfile.TarInfo("cats/zeros.png")
        info.size = 100 << 20
        archive.addfile(info, io.BytesIO(b"\0" * info.size))
    return gzip.compress(raw.getvalue(), compresslevel=9)
