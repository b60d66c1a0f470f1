"""Recognise and unpack zip and tar archives without trusting anything inside them.

Used by the service for uploads (inside the resource-limited child of ``sandbox``) and by
``ftune train ARCHIVE``. Kinds come from magic bytes, not file names. Every member name is
checked (no absolute paths, drive letters or ``..``, at most ``MAX_DEPTH`` levels and
``MAX_PATH_BYTES`` bytes, so nothing below recurses per level); only regular files and folders
are accepted (links, devices and sparse files are refused); sizes, counts and the compression
ratio are enforced while bytes are written, not taken from headers. What the standard library
would read whole or parse in more than linear time is bounded before it gets there: a zip's
central directory is counted first, tar metadata headers are capped in size and in number,
pax records are checked in linear time (CVE-2024-6232 makes Python 3.11.7's own parser
quadratic). Entries that cannot be images (empty files, folders, other names) cost an uploader
nothing but cost us as much as an image to unpack and check: an archive of too many of them is
refused (``unusable_entries``), a zip's from its central directory before anything is
unpacked, a tar's as its headers stream.
"""

from __future__ import annotations

import gzip
import logging
import lzma
import os
import re
import stat
import struct
import tarfile
import weakref
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol

from ftune.models.data.trees import remove_tree
from ftune.models.data.unusable_entries import UnusableEntries
from ftune.models.errors import ArchiveError, ArchiveTooLarge

# zipfile's own end-of-central-directory reader and its record layout (_EndRecData, _ECD_*,
# ...): private, so typeshed does not describe them, but reading the directory exactly as
# zipfile will is the point of check_zip_directory.
_zipfile: Any = zipfile


class _Readable(Protocol):
    """What tarfile reads a stream through (its own streams, gzip, a plain file)."""

    def read(self, size: int, /) -> bytes: ...

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_HEADER_BYTES = 64 << 10  # a tar long-name or pax header larger than this is hostile
MAX_GLOBAL_HEADER_BYTES = 8 << 10  # all global pax headers together: tarfile keeps them all
MAX_CHAINED_HEADERS = 8  # metadata headers in a row: tarfile recurses once for each
MAX_DIGIT_RUN = 64  # longer runs of digits in a pax header make its parser quadratic
MAX_DEPTH = 32  # folder levels of a member; deeper paths make pathlib and os.walk recurse
MAX_NAME_BYTES = 255  # one path component, as on common file systems
MAX_PATH_BYTES = 1024
_SHOWN_CHARS = 120  # of a hostile name in a message
_DRIVE = re.compile(r"^[A-Za-z]:")
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, UnicodeDecodeError,
               ValueError)
# What zipfile can decompress; Deflate64 (Windows Explorer, large files) is not among them.
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


# curl -F file=@folder sends an empty part for a folder: the likeliest cause, so the fix.
EMPTY_UPLOAD = ("the uploaded file is empty (0 bytes); to upload a folder, zip it first "
                "(cd folder && zip -r ../data.zip ., then upload data.zip), or let the "
                "client do it: `ftune remote datasets upload folder/` and the Python "
                "client's datasets.upload(folder) upload folders directly")


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int  # total unpacked size
    max_files: int
    max_ratio: float = 200.0  # unpacked / packed, above which it is a bomb
    ratio_grace_bytes: int = 64 << 20  # small archives may compress well (blank images)
    # Entries that cannot be images (empty files, folders, other names): at most this many
    # (a folder for each of FTUNE_MAX_CLASSES' default 10,000 classes), or this many for each
    # entry that can be one (see unusable_entries).
    max_unusable_entries: int = 10_000
    unusable_per_image: float = 2.0

    def unusable_entries(self) -> UnusableEntries:
        return UnusableEntries(self.max_unusable_entries, self.unusable_per_image)


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
        raise ArchiveError(EMPTY_UPLOAD)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    raise ArchiveError("the upload is not a zip, tar or tar.gz archive (checked by its content)")


def safe_member_path(name: str) -> PurePosixPath | None:
    """The member's relative path, None for the archive root; refuses anything escaping it,
    and paths too deep or too long to store (or to walk without recursion errors)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ArchiveError(f"archive entry {name.encode('utf-8', 'replace')[:_SHOWN_CHARS]!r} "
                           "has a name that is not valid UTF-8; rename it") from exc
    cleaned = name.replace("\\", "/")
    if cleaned.startswith("/") or _DRIVE.match(cleaned):
        raise ArchiveError(f"archive entry {_shown(name)} has an absolute path")
    parts = [p for p in cleaned.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"archive entry {_shown(name)} points outside the archive (..)")
    if any("\x00" in p for p in parts):
        raise ArchiveError(f"archive entry {_shown(name)} has a NUL byte in its name")
    _check_path_size(name, parts)
    return PurePosixPath(*parts) if parts else None


def _check_path_size(name: str, parts: list[str]) -> None:
    if len(parts) > MAX_DEPTH:
        raise ArchiveError(f"archive entry {_shown(name)} is nested {len(parts)} levels deep; "
                           f"at most {MAX_DEPTH} are allowed")
    if any(len(p.encode()) > MAX_NAME_BYTES for p in parts):
        raise ArchiveError(f"archive entry {_shown(name)} has a file or folder name longer "
                           f"than {MAX_NAME_BYTES} bytes")
    if len("/".join(parts).encode()) > MAX_PATH_BYTES:
        raise ArchiveError(f"archive entry {_shown(name)} has a path longer than "
                           f"{MAX_PATH_BYTES} bytes")


def _shown(name: str) -> str:
    """The name for a message: hostile ones can be megabytes long."""
    if len(name) <= _SHOWN_CHARS:
        return repr(name)
    return f"{name[:_SHOWN_CHARS]!r}… ({len(name)} characters)"


class _Writer:
    """Writes members under ``dest`` and keeps the running totals against the limits."""

    def __init__(self, dest: Path, limits: ArchiveLimits, packed_size: int, kind: str) -> None:
        self.dest, self.limits, self.packed = dest, limits, max(packed_size, 1)
        self.result = Unpacked(kind)
        self.entries = limits.unusable_entries()  # a tar's, counted as its headers stream

    def count_member(self, name: str) -> None:
        self.result.members += 1
        if self.result.members > self.limits.max_files:
            raise ArchiveError(f"archive has more than {self.limits.max_files} entries "
                               f"(at {_shown(name)}; FTUNE_MAX_ARCHIVE_FILES)")

    def folder(self, rel: PurePosixPath, name: str) -> None:
        try:
            (self.dest / rel).mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise ArchiveError(f"archive entry {_shown(name)} clashes with a file of the same name"
                               ) from exc
        except OSError as exc:
            raise ArchiveError(f"archive entry {_shown(name)} cannot be stored: {exc.strerror}"
                               ) from exc

    def file(self, rel: PurePosixPath, source: IO[bytes], name: str) -> None:
        self.result.files += 1
        target = self.dest / rel
        self.folder(rel.parent, name)
        try:
            out = open(target, "xb")  # noqa: SIM115 - closed below
        except FileExistsError as exc:
            raise ArchiveError(f"archive entry {_shown(name)} appears twice") from exc
        except (IsADirectoryError, NotADirectoryError) as exc:
            raise ArchiveError(f"archive entry {_shown(name)} clashes with a folder of the "
                               "same name") from exc
        except OSError as exc:
            raise ArchiveError(f"archive entry {_shown(name)} cannot be stored: {exc.strerror}"
                               ) from exc
        with out:
            while chunk := source.read(CHUNK):
                self.result.bytes += len(chunk)
                self._check_size(name)
                out.write(chunk)

    def _check_size(self, name: str) -> None:
        check_expansion(self.result.bytes, self.packed, self.limits, f"at {_shown(name)}")


def check_expansion(total: int, packed: int, limits: ArchiveLimits, where: str) -> None:
    if total > limits.max_bytes:
        raise ArchiveTooLarge(f"archive unpacks to more than {limits.max_bytes} bytes "
                              f"({where}; FTUNE_MAX_EXTRACTED_MB)")
    if total > limits.ratio_grace_bytes and total / packed > limits.max_ratio:
        raise ArchiveError(f"archive expands more than {limits.max_ratio:.0f}× its size "
                           f"({where}): refused as a decompression bomb")


class _CountingReader:
    """Counts every byte tarfile reads (headers included) against the limits."""

    def __init__(self, raw: _Readable, packed: int, limits: ArchiveLimits) -> None:
        self.raw, self.packed, self.limits, self.total = raw, packed, limits, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.total += len(data)
        check_expansion(self.total, self.packed, self.limits, "in the tar stream")
        return data


@dataclass
class _HeaderState:
    """What one tar stream's metadata headers have cost so far."""

    chained: int = 0  # metadata headers read in a row, before a real member
    global_bytes: int = 0


# Per open archive, and gone with it.
_HEADER_STATES: weakref.WeakKeyDictionary[tarfile.TarFile, _HeaderState] = (
    weakref.WeakKeyDictionary())


def _header_state(archive: tarfile.TarFile) -> _HeaderState:
    return _HEADER_STATES.setdefault(archive, _HeaderState())


class _BoundedTarInfo(tarfile.TarInfo):
    """Bounds what tarfile does with metadata headers before any member is seen.

    tarfile reads a long-name or pax header whole, recurses once per header in a chain,
    keeps every global pax header for the rest of the stream, and (Python 3.11.7) parses pax
    records in quadratic time; each of these is capped here, before tarfile gets to it.
    """

    # _proc_member, _proc_pax and _block are tarfile's private hooks, absent from typeshed:
    # hence the ignores below naming them.
    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise ArchiveError(f"archive entry {_shown(self.name)} is a sparse file; "
                               "pack it again without --sparse")
        if self.type not in _HEADER_TYPES:
            return super()._proc_member(tarfile_)  # type: ignore[misc]  # private hook
        state = _header_state(tarfile_)
        _check_header(self, state)
        state.chained += 1
        try:
            return super()._proc_member(tarfile_)  # type: ignore[misc]  # private hook
        finally:
            state.chained -= 1

    def _proc_pax(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        # Read the records here, check them in linear time, then let tarfile parse the same
        # bytes (it reads them first thing) from a stream that replays them.
        stream = tarfile_.fileobj
        records = stream.read(self._block(self.size))  # type: ignore[attr-defined]  # private
        check_pax_records(records)
        # A stand-in for the stream, not the whole file-object protocol tarfile declares.
        tarfile_.fileobj = _Replay(stream, records)  # type: ignore[assignment]
        try:
            return super()._proc_pax(tarfile_)  # type: ignore[misc]  # private hook
        finally:
            tarfile_.fileobj = stream


_HEADER_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                 tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


def _check_header(header: tarfile.TarInfo, state: _HeaderState) -> None:
    if header.size > MAX_HEADER_BYTES:
        raise ArchiveError(f"archive has a {header.size}-byte metadata header (at most "
                           f"{MAX_HEADER_BYTES}); refused")
    if state.chained >= MAX_CHAINED_HEADERS:
        raise ArchiveError(f"archive has more than {MAX_CHAINED_HEADERS} metadata headers in "
                           f"a row (at byte {header.offset}); refused")
    if header.type == tarfile.XGLTYPE:
        state.global_bytes += header.size
        if state.global_bytes > MAX_GLOBAL_HEADER_BYTES:
            raise ArchiveError(f"archive has more than {MAX_GLOBAL_HEADER_BYTES} bytes of "
                               "global pax headers; refused")


class _Replay:
    """A tar stream with the block just read from it put back in front."""

    def __init__(self, stream: _Readable, pending: bytes) -> None:
        self.stream = stream
        self.pending: bytes | None = pending

    def read(self, size: int) -> bytes:
        if self.pending is not None:
            data, self.pending = self.pending, None
            return data
        return self.stream.read(size)

    def __getattr__(self, name: str) -> object:
        return getattr(self.stream, name)


_PAX_LENGTH = re.compile(rb"([0-9]{1,20}) ")
_DIGIT_RUN = re.compile(rb"[0-9]{%d}" % (MAX_DIGIT_RUN + 1))


def check_pax_records(buf: bytes) -> None:
    """Refuse a pax header that tarfile could not parse in linear time.

    Records (``"<length> <keyword>=<value>\\n"``) must follow each other exactly, then only
    NUL padding; no run of digits may be longer than ``MAX_DIGIT_RUN``. GNU sparse keywords
    are refused: their map is read from the stream without a bound.
    """
    if _DIGIT_RUN.search(buf):
        raise ArchiveError(f"archive has a pax header with more than {MAX_DIGIT_RUN} digits "
                           "in a row; refused")
    pos = 0
    while match := _PAX_LENGTH.match(buf, pos):
        length = int(match.group(1))
        record = buf[pos:pos + length]
        keyword = record[match.end() - pos:].partition(b"=")[0]
        if (length <= match.end() - pos or len(record) != length or not record.endswith(b"\n")
                or b"=" not in record or not keyword or b"\n" in keyword):
            raise ArchiveError(f"archive has a malformed pax header record at byte {pos}")
        if keyword.startswith(b"GNU.sparse."):
            raise ArchiveError("archive holds a sparse file; pack it again without --sparse")
        pos += length
    if buf[pos:].strip(b"\0"):
        raise ArchiveError(f"archive has a malformed pax header record at byte {pos}")


# A central directory header: flags, unpacked size, the name, extra and comment lengths that
# follow it, and the external attributes (the Unix mode in their upper half).
_CENTRAL = struct.Struct("<4s4xH14xLHHH4xL4x")
_UTF8_NAME = 0x800  # flag: the name is UTF-8, else cp437 (as zipfile reads it)
_ZIP64_SIZE = 0xFFFFFFFF  # the size is in the zip64 extra field
_ZIP64_EXTRA = struct.Struct("<HH")  # an extra field's id and length


def check_zip_directory(path: Path, limits: ArchiveLimits) -> None:
    """Refuse a zip whose central directory lists more than ``limits.max_files`` entries, or
    too many that cannot be images, before zipfile reads it whole and builds an object for
    each entry (a 2 GiB directory of minimal entries would take over 12 GB) and before
    anything is unpacked. The declared count is checked first, then the entries are counted,
    since zipfile ignores the count. The end record is found by zipfile's own function, so
    this reads exactly the directory zipfile will."""
    max_files = limits.max_files
    with open(path, "rb", buffering=CHUNK) as f:
        size = f.seek(0, os.SEEK_END)
        try:
            end = _zipfile._EndRecData(f)
        except (OSError, struct.error, zipfile.BadZipFile):
            return  # zipfile.ZipFile says what is wrong
        if not end:
            return
        declared, directory = end[_zipfile._ECD_ENTRIES_TOTAL], end[_zipfile._ECD_SIZE]
        if declared > max_files:
            raise ArchiveError(f"archive has more than {max_files} entries ({declared} "
                               "declared; FTUNE_MAX_ARCHIVE_FILES)")
        if directory > size:
            raise ArchiveError("the zip archive is damaged or truncated: its central "
                               "directory is larger than the file")
        start = end[_zipfile._ECD_LOCATION] - directory
        if end[_zipfile._ECD_SIGNATURE] == _zipfile.stringEndArchive64:
            start -= _zipfile.sizeEndCentDir64 + _zipfile.sizeEndCentDir64Locator
        if start >= 0:
            entries = _walk_directory(f, start, directory, limits)
            entries.check("counted in the zip's central directory: nothing was unpacked",
                          scope="the archive's")


def _walk_directory(f: IO[bytes], start: int, size: int, limits: ArchiveLimits
                    ) -> UnusableEntries:
    """Walk the headers as zipfile will, counting them and telling which can be images;
    reads 46 bytes and the name of each (and a zip64 extra field), skips the rest."""
    f.seek(start)
    entries = limits.unusable_entries()
    total = 0
    while total < size:
        head = f.read(_CENTRAL.size)
        if len(head) < _CENTRAL.size:
            break
        signature, flags, unpacked, name_length, extra, comment, attributes = (
            _CENTRAL.unpack(head))
        if signature != _zipfile.stringCentralDir:
            break  # damaged: zipfile.ZipFile says so
        if entries.total >= limits.max_files:
            raise ArchiveError(f"archive has more than {limits.max_files} entries (counted in "
                               "its central directory; FTUNE_MAX_ARCHIVE_FILES)")
        name = f.read(name_length).decode("utf-8" if flags & _UTF8_NAME else "cp437",
                                          "replace")
        skip = extra + comment
        if unpacked == _ZIP64_SIZE:
            found = _zip64_size(f.read(extra))
            unpacked, skip = unpacked if found is None else found, comment
        f.seek(skip, os.SEEK_CUR)
        mode = stat.S_IFMT(attributes >> 16)
        entries.add(name, folder=name.endswith("/"), regular=mode in (0, stat.S_IFREG),
                    size=unpacked)
        total += _CENTRAL.size + name_length + extra + comment
    return entries


def _zip64_size(extra: bytes) -> int | None:
    """The unpacked size in a zip64 extra field (its first value, as zipfile reads it)."""
    pos = 0
    while pos + _ZIP64_EXTRA.size <= len(extra):
        kind, length = _ZIP64_EXTRA.unpack_from(extra, pos)
        pos += _ZIP64_EXTRA.size
        if kind == 1 and length >= 8:
            return int.from_bytes(extra[pos:pos + 8], "little")
        pos += length
    return None


def _unpack_zip(path: Path, writer: _Writer) -> None:
    check_zip_directory(path, writer.limits)
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
                raise ArchiveError(f"archive entry {_shown(info.filename)} is a symbolic link")
            if info.flag_bits & 0x1:
                raise ArchiveError(f"archive entry {_shown(info.filename)} is encrypted")
            if rel is None:
                continue
            if info.is_dir():
                writer.folder(rel, info.filename)
                continue
            if info.compress_type not in _ZIP_METHODS:
                raise ArchiveError(f"archive entry {_shown(info.filename)} uses compression method "
                                   f"{info.compress_type}, which we cannot read; zip it again "
                                   "with Deflate")
            try:
                with archive.open(info) as source:
                    writer.file(rel, source, info.filename)
            except _ZIP_ERRORS as exc:
                raise ArchiveError(f"the zip archive is damaged at {_shown(info.filename)}: {exc}"
                                   ) from exc


def _unpack_tar(path: Path, writer: _Writer, compressed: bool) -> None:
    kind = writer.result.kind
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        counted = _CountingReader(stream, writer.packed, writer.limits)
        try:
            # Streamed member by member ("r|"): a bomb is stopped as its bytes arrive.
            # Stream mode only reads; typeshed asks any fileobj for the whole file protocol.
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
    # Checked before each member is written: a tar has no index to count first.
    writer.entries.add(member.name, folder=member.isdir(), regular=member.isfile(),
                       size=member.size)
    writer.entries.check("counted from the tar headers as they streamed: refused before the "
                         "rest was unpacked", scope="the first")
    rel = safe_member_path(member.name)
    if member.issym() or member.islnk():
        raise ArchiveError(f"archive entry {_shown(member.name)} is a "
                           f"{'symbolic' if member.issym() else 'hard'} link")
    if member.isdev() or member.isfifo():
        raise ArchiveError(f"archive entry {_shown(member.name)} is a device or pipe")
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
    """Unpack ``path`` into the new folder ``dest``; on any error ``dest`` is removed.

    Running out of stack or memory on a hostile archive is refused like any other hostile
    archive (an ``ArchiveError``, a 4xx for an upload), never an internal error.
    """
    kind = detect_kind(path)
    dest.mkdir(parents=True)
    writer = _Writer(dest, limits, path.stat().st_size, kind)
    try:
        _unpack_into(path, writer)
    except (RecursionError, MemoryError) as exc:
        remove_tree(dest)
        raise ArchiveError("the archive is nested too deeply to unpack; refused"
                           if isinstance(exc, RecursionError) else
                           "unpacking the archive ran out of memory; refused") from exc
    except BaseException:
        remove_tree(dest)
        raise
    return writer.result


def _unpack_into(path: Path, writer: _Writer) -> None:
    if writer.result.kind == "zip":
        _unpack_zip(path, writer)
    else:
        _unpack_tar(path, writer, compressed=writer.result.kind == "tar.gz")
    if writer.result.files == 0:
        raise ArchiveError("the archive holds no files")
