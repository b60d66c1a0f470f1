"""Recognise and unpack zip and tar archives without trusting anything inside them.

Used by the service for uploads and by ``ftune train ARCHIVE``. Kinds come from magic bytes,
not file names. Every member name is checked (no absolute paths,
drive letters or ``..``); only regular files and folders are accepted (links and devices are
refused); sizes, counts and the compression ratio are enforced while bytes are written, not
taken from headers.
"""

from __future__ import annotations

import gzip
import lzma
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from ftune.models.errors import ArchiveError, ArchiveTooLarge

CHUNK = 1 << 20
MAX_HEADER_BYTES = 1 << 20  # a tar long-name or pax header larger than this is hostile
_DRIVE = re.compile(r"^[A-Za-z]:")
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, UnicodeDecodeError,
               ValueError)
# What zipfile can decompress; Deflate64 (Windows Explorer, large files) is not among them.
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


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
    members: int = 0  # files, folders and metadata entries
    bytes: int = 0


def detect_kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise ArchiveError("the uploaded file is empty")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    raise ArchiveError("the upload is not a zip, tar or tar.gz archive (checked by its content)")


def safe_member_path(name: str) -> PurePosixPath | None:
    """The member's relative path, None for the archive root; refuses anything escaping it."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ArchiveError(f"archive entry {name.encode('utf-8', 'replace')!r} has a name that "
                           "is not valid UTF-8; rename it") from exc
    cleaned = name.replace("\\", "/")
    if cleaned.startswith("/") or _DRIVE.match(cleaned):
        raise ArchiveError(f"archive entry {name!r} has an absolute path")
    parts = [p for p in cleaned.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"archive entry {name!r} points outside the archive (..)")
    if any("\x00" in p for p in parts):
        raise ArchiveError(f"archive entry {name!r} has a NUL byte in its name")
    return PurePosixPath(*parts) if parts else None


class _Writer:
    """Writes members under ``dest`` and keeps the running totals against the limits."""

    def __init__(self, dest: Path, limits: ArchiveLimits, packed_size: int, kind: str) -> None:
        self.dest, self.limits, self.packed = dest, limits, max(packed_size, 1)
        self.result = Unpacked(kind)

    def count_member(self, name: str) -> None:
        self.result.members += 1
        if self.result.members > self.limits.max_files:
            raise ArchiveError(f"archive has more than {self.limits.max_files} entries "
                               f"(at {name!r}; FTUNE_MAX_ARCHIVE_FILES)")

    def folder(self, rel: PurePosixPath, name: str) -> None:
        try:
            (self.dest / rel).mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise ArchiveError(f"archive entry {name!r} clashes with a file of the same name"
                               ) from exc
        except OSError as exc:
            raise ArchiveError(f"archive entry {name!r} cannot be stored: {exc.strerror}"
                               ) from exc

    def file(self, rel: PurePosixPath, source: IO[bytes], name: str) -> None:
        self.result.files += 1
        target = self.dest / rel
        self.folder(rel.parent, name)
        try:
            out = open(target, "xb")  # noqa: SIM115 - closed below
        except FileExistsError as exc:
            raise ArchiveError(f"archive entry {name!r} appears twice") from exc
        except (IsADirectoryError, NotADirectoryError) as exc:
            raise ArchiveError(f"archive entry {name!r} clashes with a folder of the same name"
                               ) from exc
        except OSError as exc:
            raise ArchiveError(f"archive entry {name!r} cannot be stored: {exc.strerror}"
                               ) from exc
        with out:
            while chunk := source.read(CHUNK):
                self.result.bytes += len(chunk)
                self._check_size(name)
                out.write(chunk)

    def _check_size(self, name: str) -> None:
        check_expansion(self.result.bytes, self.packed, self.limits, f"at {name!r}")


def check_expansion(total: int, packed: int, limits: ArchiveLimits, where: str) -> None:
    if total > limits.max_bytes:
        raise ArchiveTooLarge(f"archive unpacks to more than {limits.max_bytes} bytes "
                              f"({where}; FTUNE_MAX_EXTRACTED_MB)")
    if total > limits.ratio_grace_bytes and total / packed > limits.max_ratio:
        raise ArchiveError(f"archive expands more than {limits.max_ratio:.0f}× its size "
                           f"({where}): refused as a decompression bomb")


class _CountingReader:
    """Counts every byte tarfile reads (headers included) against the limits."""

    def __init__(self, raw: IO[bytes], packed: int, limits: ArchiveLimits) -> None:
        self.raw, self.packed, self.limits, self.total = raw, packed, limits, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.total += len(data)
        check_expansion(self.total, self.packed, self.limits, "in the tar stream")
        return data


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses huge long-name and pax headers, which tarfile would read whole into memory."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        if self.type in _HEADER_TYPES and self.size > MAX_HEADER_BYTES:
            raise ArchiveError(f"archive has a {self.size}-byte metadata header; refused")
        return super()._proc_member(tarfile_)


_HEADER_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                 tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


def _unpack_zip(path: Path, writer: _Writer) -> None:
    try:
        archive = zipfile.ZipFile(path)
    except _ZIP_ERRORS as exc:
        raise ArchiveError(f"the zip archive is damaged or truncated: {exc}") from exc
    with archive:
        for info in archive.infolist():
            writer.count_member(info.filename)
            rel = safe_member_path(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ArchiveError(f"archive entry {info.filename!r} is a symbolic link")
            if info.flag_bits & 0x1:
                raise ArchiveError(f"archive entry {info.filename!r} is encrypted")
            if rel is None:
                continue
            if info.is_dir():
                writer.folder(rel, info.filename)
                continue
            if info.compress_type not in _ZIP_METHODS:
                raise ArchiveError(f"archive entry {info.filename!r} uses compression method "
                                   f"{info.compress_type}, which we cannot read; zip it again "
                                   "with Deflate")
            try:
                with archive.open(info) as source:
                    writer.file(rel, source, info.filename)
            except _ZIP_ERRORS as exc:
                raise ArchiveError(f"the zip archive is damaged at {info.filename!r}: {exc}"
                                   ) from exc


def _unpack_tar(path: Path, writer: _Writer, compressed: bool) -> None:
    kind = writer.result.kind
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        counted = _CountingReader(stream, writer.packed, writer.limits)
        try:
            # Streamed member by member ("r|"): a bomb is stopped as its bytes arrive.
            with tarfile.open(fileobj=counted, mode="r|",  # type: ignore[call-overload]
                              tarinfo=_BoundedTarInfo) as archive:
                while (member := archive.next()) is not None:
                    archive.members.clear()  # stream mode would otherwise keep every header
                    _tar_member(archive, member, writer)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile,
                UnicodeDecodeError) as exc:
            raise ArchiveError(f"the {kind} archive is damaged or truncated: {exc}") from exc


def _tar_member(archive: tarfile.TarFile, member: tarfile.TarInfo, writer: _Writer) -> None:
    writer.count_member(member.name)
    rel = safe_member_path(member.name)
    if member.issym() or member.islnk():
        raise ArchiveError(f"archive entry {member.name!r} is a "
                           f"{'symbolic' if member.issym() else 'hard'} link")
    if member.isdev() or member.isfifo():
        raise ArchiveError(f"archive entry {member.name!r} is a device or pipe")
    if rel is None:
        return
    if member.isdir():
        writer.folder(rel, member.name)
    elif member.isfile():
        source = archive.extractfile(member)
        if source is not None:
            writer.file(rel, source, member.name)
    # Other types (sparse, contiguous) carry nothing an image folder needs and are skipped.


def unpack(path: Path, dest: Path, limits: ArchiveLimits) -> Unpacked:
    """Unpack ``path`` into the new folder ``dest``; on any error ``dest`` is removed."""
    kind = detect_kind(path)
    dest.mkdir(parents=True)
    writer = _Writer(dest, limits, path.stat().st_size, kind)
    try:
        if kind == "zip":
            _unpack_zip(path, writer)
        else:
            _unpack_tar(path, writer, compressed=kind == "tar.gz")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    if writer.result.files == 0:
        shutil.rmtree(dest, ignore_errors=True)
        raise ArchiveError("the archive holds no files")
    return writer.result
