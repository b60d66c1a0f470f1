"""Archive unpacking on its own: member names, limits enforced while writing, clean failure."""

from __future__ import annotations

import gzip
import inspect
import io
import os
import re
import struct
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from ftune.models.data import archives
from ftune.models.data.archives import (
    ArchiveLimits,
    detect_kind,
    safe_member_path,
    unpack,
)
from ftune.models.data.discover import inspect_dataset
from ftune.models.data.layout import list_dataset
from ftune.models.data.sandbox import unpack_and_inspect
from ftune.models.data.trees import remove_tree
from ftune.models.data.unusable_entries import MIN_IMAGE_BYTES
from ftune.models.errors import ArchiveError, ArchiveTooLarge
from ftune.service.storage import Storage
from ftune.testing.archives import (
    tar_folder,
    tar_of_empty_files,
    tar_with,
    zip_members,
    zip_of_empty_files,
)

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
    with pytest.raises(ArchiveError, match=r"empty.*to upload a folder, zip it first"):
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


# Hostile archives from the security review. Each builder makes real archive bytes; the
# service tests (tests/service/test_hostile_archives.py) send the same ones over HTTP.

def deep_zip(levels: int = 1500) -> bytes:
    """One file ``levels`` folders deep: pathlib's mkdir(parents=True) recursed once a level."""
    return zip_members({"/".join(["d"] * levels) + "/0.png": b"x"})


def deep_tar_folders(levels: int = 1400) -> bytes:
    """``levels`` nested folder entries, each one level deeper than the last."""
    entries = []
    for level in range(1, levels + 1):
        folder = tarfile.TarInfo("/".join(["d"] * level))
        folder.type = tarfile.DIRTYPE
        entries.append(folder)
    return tar_with(entries)


def pax_record(key: str, value: str) -> bytes:
    """One pax record, ``"<length> <key>=<value>\\n"`` (the length counts itself)."""
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def raw_tar_entry(name: str, kind: bytes, payload: bytes = b"", size: int | None = None) -> bytes:
    """A ustar header and its payload, padded, exactly as given (tarfile would clean it)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(payload) if size is None else size
    return info.tobuf(format=tarfile.USTAR_FORMAT) + payload + b"\0" * (-len(payload) % 512)


def chained_headers_tar(count: int, kind: bytes = tarfile.XHDTYPE) -> bytes:
    """``count`` pax (or GNU long-name) headers in a row before one real member; tarfile
    recursed once for each."""
    payload = (pax_record("path", "cats/a.png") if kind in (tarfile.XHDTYPE, tarfile.XGLTYPE)
               else b"cats/a.png\0")
    head = b"".join(raw_tar_entry("././@Header", kind, payload) for _ in range(count))
    return head + raw_tar_entry("cats/a.png", tarfile.REGTYPE, b"x") + b"\0" * 1024


def pax_digits_tar(size: int) -> bytes:
    """A pax header of ``size`` digits: Python 3.11.7 takes quadratic time on it."""
    return raw_tar_entry("././@PaxHeader", tarfile.XHDTYPE, b"1" * size) + b"\0" * 1024


def zip_declaring(entries: int) -> bytes:
    """A valid one-file zip whose zip64 end record declares ``entries`` entries."""
    data = zip_members({"cats/a.png": b"x"})
    end = data.rindex(b"PK\x05\x06")
    directory_size, directory_offset = struct.unpack("<LL", data[end + 12:end + 20])
    zip64_end = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries,
                            directory_size, directory_offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, end, 1)
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, directory_size,
                       0xFFFFFFFF, 0)
    return data[:end] + zip64_end + locator + eocd


@pytest.mark.parametrize(("archive", "needle"), [
    (lambda: deep_zip(), "1501 levels deep"),
    (lambda: deep_tar_folders(), "33 levels deep"),
    (lambda: zip_members({"c/" + "n" * 256 + ".png": b"x"}), "longer than 255 bytes"),
    (lambda: zip_members({"/".join(["n" * 200] * 6) + ".png": b"x"}), "longer than 1024"),
], ids=["deep-zip", "deep-tar-folders", "long-name", "long-path"])
def test_deep_or_long_paths_are_refused_naming_the_entry(tmp_path, archive, needle):
    dest = tmp_path / "out"
    with pytest.raises(ArchiveError, match=needle) as refused:
        unpack(_write(tmp_path, archive()), dest, ROOMY)
    assert "archive entry 'd/d/" in str(refused.value) or "'c/nnn" in str(refused.value) \
        or "'nnn" in str(refused.value)
    assert len(str(refused.value)) < 400, "a hostile name is shortened in the message"
    assert not dest.exists()


def test_paths_up_to_the_limits_unpack(tmp_path):
    members = {"/".join(["d"] * 31) + "/0.png": b"x", "c/" + "n" * 255: b"y"}
    result = unpack(_write(tmp_path, zip_members(members)), tmp_path / "out", ROOMY)
    assert result.files == 2


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.XGLTYPE])
def test_chained_metadata_headers_are_refused(tmp_path, kind):
    with pytest.raises(ArchiveError, match="more than 8 metadata headers in a row"):
        unpack(_write(tmp_path, chained_headers_tar(400, kind)), tmp_path / "out", ROOMY)
    assert not (tmp_path / "out").exists()


def test_a_few_headers_in_a_row_still_unpack(tmp_path):
    result = unpack(_write(tmp_path, chained_headers_tar(8)), tmp_path / "out", ROOMY)
    assert result.files == 1 and (tmp_path / "out" / "cats" / "a.png").read_bytes() == b"x"


def test_ordinary_pax_gnu_and_global_headers_unpack(tmp_path):
    long_name = "cats/" + "é" * 60 + "/" + "x" * 120 + ".png"
    for fmt, extra in ((tarfile.PAX_FORMAT, {"comment": "a" * 40}), (tarfile.GNU_FORMAT, {})):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=fmt, pax_headers=extra) as archive:
            info = tarfile.TarInfo(long_name)
            info.size, info.mtime = 1, 1_700_000_000.123456
            archive.addfile(info, io.BytesIO(b"x"))
        dest = tmp_path / f"out-{fmt}"
        assert unpack(_write(tmp_path, buffer.getvalue()), dest, ROOMY).files == 1
        assert (dest / long_name).read_bytes() == b"x"


@pytest.mark.parametrize(("payload", "needle"), [
    (pax_digits_tar(1 << 20), "metadata header"),  # over the size cap: never read
    (pax_digits_tar(60_000), "digits in a row"),  # under it: checked in linear time
    (raw_tar_entry("././@PaxHeader", tarfile.XHDTYPE, b"2 " * 30_000 + b"=\n")
     + b"\0" * 1024, "malformed pax header"),  # quadratic without long digit runs
], ids=["1MiB-digits", "60k-digits", "short-records"])
def test_pathological_pax_headers_are_refused_fast(tmp_path, payload, needle):
    started = time.monotonic()
    with pytest.raises(ArchiveError, match=needle):
        unpack(_write(tmp_path, payload), tmp_path / "out", ROOMY)
    assert time.monotonic() - started < 2
    assert not (tmp_path / "out").exists()


def test_global_pax_headers_are_capped_in_total(tmp_path):
    parts = []
    for i in range(20):  # 20 global headers of 1 KiB, each before its own member
        parts.append(raw_tar_entry("././@GlobalHead", tarfile.XGLTYPE,
                                   pax_record(f"key{i}", "v" * 1000)))
        parts.append(raw_tar_entry(f"cats/{i}.png", tarfile.REGTYPE, b"x"))
    with pytest.raises(ArchiveError, match="global pax headers"):
        unpack(_write(tmp_path, b"".join(parts) + b"\0" * 1024), tmp_path / "out", ROOMY)


def test_sparse_files_are_refused(tmp_path):
    payload = raw_tar_entry("cats/a.png", tarfile.GNUTYPE_SPARSE, b"", size=0) + b"\0" * 1024
    with pytest.raises(ArchiveError, match="sparse"):
        unpack(_write(tmp_path, payload), tmp_path / "out", ROOMY)
    sparse_pax = (raw_tar_entry("././@PaxHeader", tarfile.XHDTYPE,
                                pax_record("GNU.sparse.major", "1")
                                + pax_record("GNU.sparse.minor", "0"))
                  + raw_tar_entry("cats/a.png", tarfile.REGTYPE, b"1\n") + b"\0" * 1024)
    with pytest.raises(ArchiveError, match="sparse"):
        unpack(_write(tmp_path, sparse_pax), tmp_path / "out2", ROOMY)


def test_zip_entry_count_is_checked_before_the_directory_is_parsed(tmp_path):
    limits = ArchiveLimits(1 << 20, max_files=1000)
    with pytest.raises(ArchiveError, match=r"more than 1000 entries \(10000000000000 declared"):
        unpack(_write(tmp_path, zip_declaring(10**13)), tmp_path / "a", limits)
    assert unpack(_write(tmp_path, zip_declaring(1)), tmp_path / "b", limits).files == 1
    # zipfile ignores the declared count: a directory with more entries than declared is
    # counted, 46 bytes an entry, before zipfile builds an object for each.
    data = bytearray(zip_members({f"c/{i}": b"" for i in range(3000)}))
    end = data.rindex(b"PK\x05\x06")
    data[end + 8:end + 12] = struct.pack("<HH", 1, 1)
    with pytest.raises(ArchiveError, match="counted in its central directory"):
        unpack(_write(tmp_path, bytes(data)), tmp_path / "c", limits)
    # A directory larger than the file would make zipfile allocate all of it.
    data = bytearray(zip_members({"c/a.png": b"x"}))
    end = data.rindex(b"PK\x05\x06")
    data[end + 12:end + 16] = struct.pack("<L", 0xFFFFFFF0)
    with pytest.raises(ArchiveError, match="damaged or truncated"):
        unpack(_write(tmp_path, bytes(data)), tmp_path / "d", limits)


def test_running_out_of_stack_is_an_archive_error(tmp_path):
    # Shallow paths need little stack; with the limit just above this test's own depth the
    # unpacking recursion runs out of it, as a hostile archive once made it.
    payload = zip_members({"/".join(["d"] * 30) + "/0.png": b"x"})
    path = _write(tmp_path, payload)
    (tmp_path / "parent").mkdir()
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack(0)) + 20)
    try:
        with pytest.raises(ArchiveError, match="nested too deeply"):
            unpack(path, tmp_path / "parent" / "out", ROOMY)
    finally:
        sys.setrecursionlimit(previous)
    assert not (tmp_path / "parent" / "out").exists()


def make_deep_tree(root: Path, levels: int) -> None:
    """``levels`` nested folders (a file in each), built relative to open folders: the full
    path is longer than PATH_MAX."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.close(os.open("f", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
            os.mkdir("dd", dir_fd=fd)
            child = os.open("dd", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def test_remove_tree_handles_any_depth_and_never_follows_links(tmp_path):
    make_deep_tree(tmp_path / "deep", 2000)
    outside = tmp_path / "keep"
    outside.mkdir()
    (outside / "precious").write_text("x")
    (tmp_path / "deep" / "link").symlink_to(outside)
    assert remove_tree(tmp_path / "deep") is True
    assert not (tmp_path / "deep").exists()
    assert (outside / "precious").exists()
    assert remove_tree(tmp_path / "missing") is True
    (tmp_path / "file").write_text("x")
    assert remove_tree(tmp_path / "file") and not (tmp_path / "file").exists()


def _age(path: Path, days: float = 2) -> None:
    old = time.time() - days * 86400
    os.utime(path, (old, old), follow_symlinks=False)


def test_sweep_stale_removes_deep_leftovers_and_never_raises(tmp_path):
    storage = Storage(tmp_path / "home")
    storage.prepare()
    deep = storage.datasets / ".0123456789abcdef0123456789abcdef.staging"
    make_deep_tree(deep, 2000)
    trash = storage.tmp / "deleted-0123456789abcdef0123456789abcdef"
    make_deep_tree(trash, 50)
    part = storage.uploads / "x.part"
    part.write_bytes(b"x")
    fresh = storage.datasets / ".fedcba9876543210fedcba9876543210.staging"
    fresh.mkdir()
    for path in (deep, trash, part):
        _age(path)
    assert storage.sweep_stale() == 3
    assert not deep.exists() and not trash.exists() and not part.exists()
    assert fresh.exists(), "a recent folder may belong to an upload in progress"


def test_sweep_stale_logs_what_it_cannot_remove(tmp_path, caplog, monkeypatch):
    storage = Storage(tmp_path / "home")
    storage.prepare()
    stuck = storage.datasets / ".0123456789abcdef0123456789abcdef.staging"
    (stuck / "locked").mkdir(parents=True)
    (stuck / "locked" / "0.png").write_bytes(b"x")
    other = storage.uploads / "y.part"
    other.write_bytes(b"x")
    _age(stuck)
    _age(other)
    real_unlink = os.unlink

    def refusing_unlink(name, *args, **kwargs):  # what a read-only folder does (root ignores
        if str(name).endswith("0.png"):         # permissions, so it is injected here)
            raise PermissionError(13, "Permission denied", str(name))
        return real_unlink(name, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refusing_unlink)
    assert storage.sweep_stale() == 1
    assert "could not remove" in caplog.text and not other.exists()
    assert (stuck / "locked" / "0.png").exists()


# labels.csv is read as a stream: bounded memory whatever its size.

def _png(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), (shade, 255 - shade, 0)).save(path)


def test_a_manifest_row_naming_the_folder_itself_is_skipped(tmp_path):
    for i in range(4):
        _png(tmp_path / f"{i}.png", 40 * i)
    (tmp_path / "labels.csv").write_text(
        "path,label\n.,cat\n./,cat\n0.png,cat\n1.png,cat\n2.png,dog\n3.png,dog,extra\n")
    report = inspect_dataset(tmp_path).report.to_dict()
    rows = next(w for w in report["warnings"] if w["code"] == "manifest_rows")
    assert rows["count"] == 2 and "does not name a file" in rows["items"][0]["reason"]
    assert report["splits"]["train"]["per_class"] == {"cat": 2, "dog": 2}


def test_many_bad_manifest_rows_are_counted_but_few_are_kept(tmp_path):
    _png(tmp_path / "0.png", 0)
    lines = ["path,label"] + [f"missing/{i}.png,c{i % 3}" for i in range(100_000)]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    listing = list_dataset(tmp_path)
    code, message, items, count = listing.problems[0]
    assert code == "manifest_rows" and message.startswith("100000 row(s)")
    assert count == 100_000 and len(items) == 20, "only examples are held in memory"
    rows = next(w for w in inspect_dataset(tmp_path).report.to_dict()["warnings"]
                if w["code"] == "manifest_rows")
    assert rows["count"] == 100_000 and len(rows["items"]) == 20
    assert rows["items"][0] == {"row": "labels.csv line 2",
                                "reason": "missing/0.png does not exist"}


def test_manifest_rows_and_lines_are_capped(tmp_path, engine_config):
    engine_config(max_archive_files=50)
    (tmp_path / "labels.csv").write_text("path,label\n" + "a.png,cat\n" * 51)
    report = inspect_dataset(tmp_path).report.to_dict()
    assert report["errors"][0]["code"] == "manifest_invalid"
    assert "more than 50 rows" in report["errors"][0]["message"]
    (tmp_path / "labels.csv").write_text("path,label\n" + "a" * (2 << 20) + ",cat\n")
    report = inspect_dataset(tmp_path).report.to_dict()
    assert "longer than" in report["errors"][0]["message"]


# The child process that unpacks and checks uploads (models.data.sandbox).

SANDBOX = {"limits": ROOMY, "min_per_class": 2, "max_pixels": 10**8, "max_classes": 100,
           "memory_mb": 2048, "cpu_s": 120, "timeout_s": 120}


@pytest.mark.processes
def test_the_sandbox_reports_what_an_in_process_check_finds(tmp_path, tiny_folder):
    path = _write(tmp_path, tar_folder(tiny_folder))
    result = unpack_and_inspect(path, tmp_path / "out", **SANDBOX)
    inspection = inspect_dataset(tmp_path / "out")
    assert result.ok and result.report == inspection.report.to_dict()
    assert result.content_hash == inspection.index.content_hash
    assert result.classes == ["animal0", "animal1", "animal2"] and result.num_images == 36
    assert result.splits == {"train": 36} and result.files == 36
    assert result.class_counts == {"train": {"animal0": 12, "animal1": 12, "animal2": 12}}
    assert result.size_bytes == sum(p.stat().st_size for p in tiny_folder.rglob("*.png"))


@pytest.mark.processes
def test_the_sandbox_passes_refusals_on_and_leaves_nothing(tmp_path):
    with pytest.raises(ArchiveError, match="levels deep"):
        unpack_and_inspect(_write(tmp_path, deep_zip()), tmp_path / "a", **SANDBOX)
    small = {**SANDBOX, "limits": ArchiveLimits(max_bytes=10, max_files=100)}
    with pytest.raises(ArchiveTooLarge, match="more than 10 bytes"):
        unpack_and_inspect(_write(tmp_path, zip_members({"c/a.png": b"x" * 100})),
                           tmp_path / "b", **small)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.processes
def test_too_many_classes_is_a_lint_error(tmp_path, tiny_folder):
    path = _write(tmp_path, tar_folder(tiny_folder))
    result = unpack_and_inspect(path, tmp_path / "out", **{**SANDBOX, "max_classes": 2})
    assert not result.ok
    error = result.errors[0]
    assert error["code"] == "too_many_classes" and error["count"] == 3
    assert "at most 2" in error["message"] and "FTUNE_MAX_CLASSES" in error["action"]


def _pixel_heavy_zip(copies: int) -> bytes:
    """Real PNGs of 81 megapixels (under the pixel limit), 80 kB each: cheap to send,
    about 0.2 s of CPU each to decode."""
    buffer = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buffer, "PNG")
    return zip_members({f"c{i % 2}/{i}.png": buffer.getvalue() for i in range(copies)})


@pytest.mark.processes
@pytest.mark.parametrize(("limit", "needle"), [
    ({"timeout_s": 0.5}, "longer than 0.5 s (FTUNE_UNPACK_TIMEOUT_S)"),
    ({"cpu_s": 1}, "more than 1 s of CPU time (FTUNE_UNPACK_CPU_S)"),
    ({"memory_mb": 24}, "more than 24 MB of memory (FTUNE_UNPACK_MEMORY_MB)"),
])
def test_a_child_over_its_limits_is_stopped_and_named(tmp_path, limit, needle):
    path = _write(tmp_path, _pixel_heavy_zip(40))
    started = time.monotonic()
    with pytest.raises(ArchiveError, match=re.escape(needle)):
        unpack_and_inspect(path, tmp_path / "out", **{**SANDBOX, **limit})
    assert time.monotonic() - started < 30
    assert not (tmp_path / "out").exists()


# Entries that cannot be images cost an uploader nothing: an archive of too many of them is
# refused from its own index (a zip's central directory, a tar's headers), not after
# unpacking and checking every one.

@pytest.fixture
def written(monkeypatch) -> list[str]:
    """The names of the files unpack writes (the real writer, watched)."""
    names: list[str] = []
    write = archives._Writer.file

    def watched(self, rel, source, name):
        names.append(name)
        return write(self, rel, source, name)

    monkeypatch.setattr(archives._Writer, "file", watched)
    return names


def test_a_zip_of_200000_empty_files_is_refused_before_unpacking(tmp_path, written):
    path = _write(tmp_path, zip_of_empty_files(200_000))
    dest = tmp_path / "out"
    with pytest.raises(ArchiveError) as refused:
        unpack(path, dest, ArchiveLimits(max_bytes=1 << 40, max_files=500_000))
    message = str(refused.value)
    assert message.startswith("200000 of the archive's 200000 entries cannot be images: "
                              f"200000 files under {MIN_IMAGE_BYTES} bytes")
    assert "counted in the zip's central directory: nothing was unpacked" in message
    assert written == [] and not dest.exists()


def test_a_tar_of_200000_empty_files_stops_at_the_allowance(tmp_path, written):
    path = _write(tmp_path, tar_of_empty_files(200_000))
    limits = ArchiveLimits(max_bytes=1 << 40, max_files=500_000, max_unusable_entries=1000)
    with pytest.raises(ArchiveError, match="1001 of the first 1001 entries cannot be images"
                       ) as refused:
        unpack(path, tmp_path / "out", limits)
    assert "refused before the rest was unpacked" in str(refused.value)
    assert len(written) == 1000, "a tar has no index: what came before the limit was written"
    assert not (tmp_path / "out").exists()


def _image_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def _cluttered(images: int, junk: int) -> dict[str, bytes]:
    """``images`` real PNGs, then ``junk`` entries of the kinds that cannot be images."""
    members = {f"cats/{i}.png": _image_bytes() for i in range(images)}
    kinds = ("cats/{}.DS_Store", "__MACOSX/cats/._{}.png", "cats/empty{}.png", "README{}.txt")
    for i in range(junk):
        members[kinds[i % len(kinds)].format(i)] = b"x" * (4096 if i % 4 == 1 else i % 2)
    return members


@pytest.mark.parametrize(("build", "scope"), [(zip_members, "the archive's"),
                                              (lambda m: _tar_members(m), "the first")],
                         ids=["zip", "tar"])
def test_some_clutter_per_image_is_accepted_and_more_is_refused(tmp_path, build, scope):
    limits = ArchiveLimits(max_bytes=1 << 30, max_files=1000, max_unusable_entries=10)
    members = _cluttered(images=8, junk=16)  # over the allowance, but 2 per image
    assert unpack(_write(tmp_path, build(members)), tmp_path / "a", limits).files == 24
    with pytest.raises(ArchiveError) as refused:
        unpack(_write(tmp_path, build(_cluttered(images=8, junk=17))), tmp_path / "b", limits)
    assert str(refused.value).startswith(
        f"17 of {scope} 25 entries cannot be images: 4 files under 24 bytes (too small for "
        "any image), 0 folders, 13 hidden, non-image or special entries; 8 can. At most 10 "
        "such entries are accepted, or 2 for each entry that can be an image")
    assert not (tmp_path / "b").exists()


def _tar_members(members: dict[str, bytes]) -> bytes:
    return tar_with([tarfile.TarInfo(name) for name in members], members)


def test_a_zip_is_judged_on_its_whole_directory_whatever_the_order(tmp_path):
    """A zip's clutter may come first: its directory is counted whole before deciding."""
    limits = ArchiveLimits(max_bytes=1 << 30, max_files=1000, max_unusable_entries=10)
    members = {f"notes/{i}.txt": b"" for i in range(30)}
    members |= {f"cats/{i}.png": _image_bytes() for i in range(15)}
    assert unpack(_write(tmp_path, zip_members(members)), tmp_path / "a", limits).files == 45


def test_folders_and_links_count_as_entries_that_cannot_be_images(tmp_path):
    limits = ArchiveLimits(max_bytes=1 << 30, max_files=1000, max_unusable_entries=3)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in ("a/", "b/", "c/", "d/"):
            archive.writestr(zipfile.ZipInfo(name), b"")
        link = zipfile.ZipInfo("a/link.png")
        link.external_attr = 0o120777 << 16
        archive.writestr(link, "/etc/passwd" + "x" * 40)
    with pytest.raises(ArchiveError, match="4 folders, 1 hidden, non-image or special"):
        unpack(_write(tmp_path, buffer.getvalue()), tmp_path / "out", limits)


def test_a_zip64_size_is_read_from_its_extra_field(tmp_path):
    """Sizes of 0xFFFFFFFF in the directory mean "in the zip64 extra field", where zipfile
    reads them: 0 there is an empty file."""
    data = bytearray(zip_members({f"c/{i}.png": b"" for i in range(5)}))
    end = data.rindex(b"PK\x05\x06")
    directory_size, directory_start = struct.unpack("<LL", data[end + 12:end + 20])
    headers, pos = [], directory_start
    while pos < directory_start + directory_size:
        name_length, = struct.unpack("<H", data[pos + 28:pos + 30])
        header = bytearray(data[pos:pos + 46 + name_length])
        header[20:28] = b"\xff" * 8  # both sizes in the extra field
        header[30:32] = struct.pack("<H", 20)
        headers.append(bytes(header) + struct.pack("<HHQQ", 1, 16, 0, 0))
        pos += 46 + name_length
    directory = b"".join(headers)
    eocd = bytearray(data[end:])
    eocd[12:16] = struct.pack("<L", len(directory))
    payload = bytes(data[:directory_start]) + directory + bytes(eocd)
    limits = ArchiveLimits(max_bytes=1 << 30, max_files=1000, max_unusable_entries=4)
    with pytest.raises(ArchiveError, match="5 files under 24 bytes"):
        unpack(_write(tmp_path, payload), tmp_path / "out", limits)
    roomy = ArchiveLimits(max_bytes=1 << 30, max_files=1000)
    assert unpack(_write(tmp_path, payload), tmp_path / "ok", roomy).files == 5
