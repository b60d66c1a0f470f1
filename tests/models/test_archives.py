"""Archive unpacking on its own: member names, limits enforced while writing, clean failure."""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile

import pytest

from ftune.models.data.archives import ArchiveLimits, detect_kind, safe_member_path, unpack
from ftune.models.errors import ArchiveError
from ftune.testing.archives import tar_folder, tar_with, zip_members

ROOMY = ArchiveLimits(max_bytes=10 << 20, max_files=1000)


@pytest.mark.parametrize(("name", "expected"), [
    ("cats/a.png", "cats/a.png"),
    ("./cats//a.png", "cats/a.png"),
    ("cats\\a.png", "cats/a.png"),
    ("./", None),
])
def test_safe_member_path_normalises(name, expected):
    result = safe_member_path(name)
    assert (None if result is None else str(result)) == expected


@pytest.mark.parametrize("name", ["../a.png", "cats/../../a.png", "/abs/a.png", "\\\\server\\a",
                                  "C:\\windows\\a.png", "d:/a.png", "cats/a\x00.png"])
def test_safe_member_path_refuses_escapes(name):
    with pytest.raises(ArchiveError):
        safe_member_path(name)


def _write(tmp_path, payload: bytes):
    path = tmp_path / "upload.part"
    path.write_bytes(payload)
    return path


def test_detect_kind_reads_bytes_not_names(tmp_path, tiny_folder):
    assert detect_kind(_write(tmp_path, zip_members({"a/b": b"x"}))) == "zip"
    assert detect_kind(_write(tmp_path, tar_folder(tiny_folder))) == "tar.gz"
    assert detect_kind(_write(tmp_path, tar_folder(tiny_folder, mode="w"))) == "tar"
    with pytest.raises(ArchiveError, match="empty"):
        detect_kind(_write(tmp_path, b""))


def test_zip_bomb_is_stopped_while_writing(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("cats/zeros.png", b"\0" * (80 << 20))  # 80 MB of zeros, ~80 kB packed
    dest = tmp_path / "out"
    limits = ArchiveLimits(max_bytes=1 << 40, max_files=10)
    with pytest.raises(ArchiveError, match="decompression bomb"):
        unpack(_write(tmp_path, buffer.getvalue()), dest, limits)
    assert not dest.exists()


def test_size_and_count_limits(tmp_path):
    payload = zip_members({f"c/{i}.png": b"x" * 100 for i in range(20)})
    with pytest.raises(ArchiveError, match="more than 5 entries"):
        unpack(_write(tmp_path, payload), tmp_path / "a", ArchiveLimits(1 << 20, max_files=5))
    with pytest.raises(ArchiveError, match="unpacks to more than 1000 bytes"):
        unpack(_write(tmp_path, payload), tmp_path / "b", ArchiveLimits(1000, max_files=100))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_duplicate_and_clashing_members_are_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("c/a.png", b"1")
        archive.writestr("c/a.png", b"2")
    with pytest.raises(ArchiveError, match="appears twice"):
        unpack(_write(tmp_path, buffer.getvalue()), tmp_path / "d", ROOMY)
    with pytest.raises(ArchiveError, match="clashes"):
        unpack(_write(tmp_path, zip_members({"c": b"file", "c/a.png": b"x"})), tmp_path / "e",
               ROOMY)


def test_an_archive_of_folders_only_is_empty(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo("cats/"), b"")
    with pytest.raises(ArchiveError, match="no files"):
        unpack(_write(tmp_path, buffer.getvalue()), tmp_path / "f", ROOMY)
    assert not (tmp_path / "f").exists()


def test_good_archive_unpacks_with_counts(tmp_path, tiny_folder):
    result = unpack(_write(tmp_path, tar_folder(tiny_folder)), tmp_path / "g", ROOMY)
    assert result.kind == "tar.gz" and result.files == 36
    assert len(list((tmp_path / "g").rglob("*.png"))) == 36


def _gnu_longname_bomb(size: int) -> bytes:
    """A tar.gz whose first entry is a GNU long-name header of ``size`` zero bytes."""
    header = tarfile.TarInfo("././@LongLink")
    header.type = tarfile.GNUTYPE_LONGNAME
    header.size = size
    raw = io.BytesIO()
    raw.write(header.tobuf(format=tarfile.GNU_FORMAT))
    raw.write(b"\0" * size)
    raw.write(b"\0" * (512 - size % 512 if size % 512 else 0))
    return gzip.compress(raw.getvalue(), compresslevel=9)


def test_huge_tar_metadata_headers_are_refused_before_being_read(tmp_path):
    payload = _gnu_longname_bomb(50 << 20)  # 50 MB of name: refused at the header
    assert len(payload) < 200_000
    with pytest.raises(ArchiveError, match="metadata header"):
        unpack(_write(tmp_path, payload), tmp_path / "h", ROOMY)


def test_names_that_are_not_utf8_are_refused(tmp_path):
    info = tarfile.TarInfo("caf\udce9/0.png")  # what tarfile makes of a latin-1 byte
    info.size = 1
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT,
                      encoding="latin-1", errors="surrogateescape") as archive:
        archive.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ArchiveError, match="not valid UTF-8"):
        unpack(_write(tmp_path, buffer.getvalue()), tmp_path / "i", ROOMY)


def test_folders_count_against_the_entry_limit(tmp_path):
    entries = []
    for i in range(50):
        folder = tarfile.TarInfo(f"d{i}")
        folder.type = tarfile.DIRTYPE
        entries.append(folder)
    with pytest.raises(ArchiveError, match="more than 10 entries"):
        unpack(_write(tmp_path, tar_with(entries)), tmp_path / "j",
               ArchiveLimits(1 << 20, max_files=10))


def test_corrupt_compressed_zip_data_is_422(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("c/a.png", bytes(range(256)) * 64)
    data = bytearray(buffer.getvalue())
    start = 30 + len("c/a.png")  # local header, then the deflate stream
    data[start:start + 40] = b"\xff" * 40
    with pytest.raises(ArchiveError, match="damaged"):
        unpack(_write(tmp_path, bytes(data)), tmp_path / "k", ROOMY)
    assert not (tmp_path / "k").exists()


def test_tar_gz_bomb_is_stopped_while_reading_the_stream(tmp_path):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        info = tarfile.TarInfo("cats/zeros.png")
        info.size = 80 << 20
        archive.addfile(info, io.BytesIO(b"\0" * info.size))
    payload = gzip.compress(raw.getvalue(), compresslevel=9)
    assert len(payload) < 200_000
    dest = tmp_path / "out"
    with pytest.raises(ArchiveError, match="decompression bomb"):
        unpack(_write(tmp_path, payload), dest, ArchiveLimits(1 << 40, max_files=10))
    assert not dest.exists()


def test_an_unreadable_zip_compression_method_is_named(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("c/a.png", b"x" * 100)
    data = bytearray(buffer.getvalue())
    # Mark the entry as Deflate64 (method 9) in both the local and the central header.
    data[8:10] = (9).to_bytes(2, "little")
    central = data.rfind(b"PK\x01\x02")
    data[central + 10:central + 12] = (9).to_bytes(2, "little")
    with pytest.raises(ArchiveError, match="compression method 9"):
        unpack(_write(tmp_path, bytes(data)), tmp_path / "z", ROOMY)
