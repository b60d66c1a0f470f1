"""Recognise and unpack zip and tar archives without trusting anything inside them.

Kinds come from magic bytes, not file names. Every member name is checked (no absolute paths,
drive letters or ``..``); only regular files and folders are accepted (links and devices are
refused); sizes, counts and the compression ratio are enforced while bytes are written, not
taken from headers.
"""

from __future__ import annotations

import re
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO
from zlib import error as ZlibError

from service.errors import InvalidInput

CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int  # total unpacked size
    max_files: int
    max_ratio: float = 200.0  # unpacked / packed, above which it is a bomb
    ratio_grace_bytes: int = 64 << 20  # small archives may compress well (blank images)


@dataclass
class Unpacked:
    kind: str
    files: int = 0
    bytes: int = 0


def detect_kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise InvalidInput("the uploaded file is empty")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    raise InvalidInput("the upload is not a zip, tar or tar.gz archive (checked by its content)")


def safe_member_path(name: str) -> PurePosixPath | None:
    """The member's relative path, None for the archive root; refuses anything escaping it."""
    cleaned = name.replace("\\", "/")
    if cleaned.startswith("/") or _DRIVE.match(cleaned):
        raise InvalidInput(f"archive entry {name!r} has an absolute path")
    parts = [p for p in cleaned.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidInput(f"archive entry {name!r} points outside the archive (..)")
    if any("\x00" in p for p in parts):
        raise InvalidInput(f"archive entry {name!r} has a NUL byte in its name")
    return PurePosixPath(*parts) if parts else None


class _Writer:
    """Writes members under ``dest`` and keeps the running totals against the limits."""

    def __init__(self, dest: Path, limits: ArchiveLimits, packed_size: int, kind: str) -> None:
        self.dest, self.limits, self.packed = dest, limits, max(packed_size, 1)
        self.result = Unpacked(kind)

    def folder(self, rel: PurePosixPath) -> None:
        (self.dest / rel).mkdir(parents=True, exist_ok=True)

    def file(self, rel: PurePosixPath, source: IO[bytes], name: str) -> None:
        self.result.files += 1
        if self.result.files > self.limits.max_files:
            raise InvalidInput(f"archive has more than {self.limits.max_files} files "
                               "(FTUNE_MAX_ARCHIVE_FILES)")
        target = self.dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            out = open(target, "xb")  # noqa: SIM115 - closed below
        except FileExistsError as exc:
            raise InvalidInput(f"archive entry {name!r} appears twice") from exc
        except (IsADirectoryError, NotADirectoryError) as exc:
            raise InvalidInput(f"archive entry {name!r} clashes with a folder of the same name"
                               ) from exc
        with out:
            while chunk := source.read(CHUNK):
                self.result.bytes += len(chunk)
                self._check_size(name)
                out.write(chunk)

    def _check_size(self, name: str) -> None:
        total = self.result.bytes
        if total > self.limits.max_bytes:
            raise InvalidInput(f"archive unpacks to more than {self.limits.max_bytes} bytes "
                               f"(at {name!r}; FTUNE_MAX_EXTRACTED_MB)")
        if (total > self.limits.ratio_grace_bytes
                and total / self.packed > self.limits.max_ratio):
            raise InvalidInput(f"archive expands more than {self.limits.max_ratio:.0f}× its "
                               f"size (at {name!r}): refused as a decompression bomb")


def _unpack_zip(path: Path, writer: _Writer) -> None:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise InvalidInput(f"the zip archive is damaged or truncated: {exc}") from exc
    with archive:
        for info in archive.infolist():
            rel = safe_member_path(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise InvalidInput(f"archive entry {info.filename!r} is a symbolic link")
            if info.flag_bits & 0x1:
                raise InvalidInput(f"archive entry {info.filename!r} is encrypted")
            if rel is None:
                continue
            if info.is_dir():
                writer.folder(rel)
                continue
            try:
                with archive.open(info) as source:
                    writer.file(rel, source, info.filename)
            except (zipfile.BadZipFile, EOFError, OSError) as exc:
                raise InvalidInput(f"the zip archive is damaged at {info.filename!r}: {exc}"
                                   ) from exc


def _unpack_tar(path: Path, writer: _Writer, mode: str) -> None:
    try:
        archive = tarfile.open(path, mode=mode)  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InvalidInput(f"the {writer.result.kind} archive is damaged or not a tar: {exc}"
                           ) from exc
    with archive:
        try:
            # Streamed member by member: a bomb is stopped as its bytes arrive.
            for member in archive:
                rel = safe_member_path(member.name)
                if member.issym() or member.islnk():
                    raise InvalidInput(f"archive entry {member.name!r} is a "
                                       f"{'symbolic' if member.issym() else 'hard'} link")
                if member.isdev() or member.isfifo():
                    raise InvalidInput(f"archive entry {member.name!r} is a device or pipe")
                if rel is None:
                    continue
                if member.isdir():
                    writer.folder(rel)
                elif member.isfile():
                    source = archive.extractfile(member)
                    if source is not None:
                        writer.file(rel, source, member.name)
                # pax/GNU metadata members carry no files and are skipped.
        except (tarfile.TarError, EOFError, ZlibError, OSError) as exc:
            raise InvalidInput(f"the {writer.result.kind} archive is damaged or truncated: {exc}"
                               ) from exc


def unpack(path: Path, dest: Path, limits: ArchiveLimits) -> Unpacked:
    """Unpack ``path`` into the new folder ``dest``; on any error ``dest`` is removed."""
    kind = detect_kind(path)
    dest.mkdir(parents=True)
    writer = _Writer(dest, limits, path.stat().st_size, kind)
    try:
        if kind == "zip":
            _unpack_zip(path, writer)
        else:
            _unpack_tar(path, writer, "r|gz" if kind == "tar.gz" else "r|")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    if writer.result.files == 0:
        shutil.rmtree(dest, ignore_errors=True)
        raise InvalidInput("the archive holds no files")
    return writer.result
