"""Build dataset archives (zip, tar, tar.gz) in memory from folders or raw members."""

from __future__ import annotations

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
