"""The hostile-archive corpus through the real API: every archive is refused with a 4xx (never
a 500), nothing is written outside the data directory, nothing is left behind in it, and the
API keeps answering while and after it checks them."""

from __future__ import annotations

import io
import shutil
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from ftune.processes import Stack
from ftune.service.auth.principal import Role
from ftune.testing.access import make_key
from ftune.testing.archives import (
    tar_folder,
    tar_gz_bomb,
    tar_of_empty_files,
    tar_with,
    zip_bomb,
    zip_folder,
    zip_members,
    zip_of_empty_files,
)
from tests.models.test_archives import (
    chained_headers_tar,
    deep_tar_folders,
    deep_zip,
    pax_digits_tar,
    zip_declaring,
)


def _upload(client, payload: bytes, filename: str = "data.zip"):
    return client.post("/v1/datasets", files={"file": (filename, payload)},
                       params={"dedupe": "false"})


def _outside(home: Path) -> set[Path]:
    """Every path next to the data directory (and below its neighbours)."""
    return {p for p in home.parent.rglob("*") if p != home and home not in p.parents}


def _leftovers(home: Path) -> list[Path]:
    """What a refused upload may have left: upload parts and unpacking folders."""
    return (list((home / "uploads").iterdir())
            + [p for p in (home / "datasets").iterdir() if p.name.startswith(".")])


def _link(kind: bytes) -> bytes:
    link = tarfile.TarInfo("cats/link.png")
    link.type = kind
    link.linkname = "/etc/passwd"
    return tar_with([tarfile.TarInfo("cats/a.png"), link], {"cats/a.png": b"x"})


def _zip_symlink() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cats/a.png", b"x")
        info = zipfile.ZipInfo("cats/link.png")
        info.external_attr = 0o120777 << 16  # a symbolic link, as Info-ZIP stores one
        archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()




def _many_classes() -> bytes:
    """10,001 class folders of one file each: one over FTUNE_MAX_CLASSES' default. The files
    are image-sized, so the classes are counted (and refused) before any is decoded."""
    return zip_members({f"c{i:05d}/0.png": b"x" * 32 for i in range(10_001)})


def _empty_class_folders() -> bytes:
    """10,001 empty folders: entries that cannot be images, over the allowance of 10,000."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(10_001):
            archive.writestr(zipfile.ZipInfo(f"c{i:05d}/"), b"")
        archive.writestr("c00000/0.png", b"x")
    return buffer.getvalue()


def _dot_manifest_row() -> bytes:
    return zip_members({"labels.csv": b"path,label\n.,cats\n0.png,dogs\n", "0.png": b"x"})


def _truncated_tar_gz(folder: Path) -> bytes:
    payload = tar_folder(folder)
    return payload[: len(payload) // 2]


# (archive, a phrase the refusal must contain)
CORPUS: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "deep-zip": (lambda _: deep_zip(), "levels deep"),
    "deep-tar-folders": (lambda _: deep_tar_folders(), "levels deep"),
    "chained-pax-headers": (lambda _: chained_headers_tar(400), "metadata headers in a row"),
    "chained-gnu-long-names": (lambda _: chained_headers_tar(400, tarfile.GNUTYPE_LONGNAME),
                               "metadata headers in a row"),
    "1MiB-pax-digits": (lambda _: pax_digits_tar(1 << 20), "metadata header"),
    "60k-pax-digits": (lambda _: pax_digits_tar(60_000), "digits in a row"),
    "zip64-declares-1e13-entries": (lambda _: zip_declaring(10**13), "declared"),
    "too-many-classes": (lambda _: _many_classes(), "at most 10000 are allowed"),
    "10001-empty-folders": (lambda _: _empty_class_folders(), "10001 folders"),
    "labels-csv-dot-row": (lambda _: _dot_manifest_row(), "at least 2 classes"),
    "zip-slip": (lambda _: zip_members({"cats/ok.png": b"x", "../../../evil.png": b"evil"}),
                 "outside"),
    "tar-slip": (lambda _: tar_with([tarfile.TarInfo("a/../../../../evil.png")],
                                    {"a/../../../../evil.png": b"evil"}), "outside"),
    "absolute-zip": (lambda _: zip_members({"/tmp/evil.png": b"evil"}), "absolute path"),
    "absolute-tar": (lambda _: tar_with([tarfile.TarInfo("/tmp/evil.png")],
                                        {"/tmp/evil.png": b"evil"}), "absolute path"),
    "tar-symlink": (lambda _: _link(tarfile.SYMTYPE), "symbolic link"),
    "tar-hard-link": (lambda _: _link(tarfile.LNKTYPE), "hard link"),
    "zip-symlink": (lambda _: _zip_symlink(), "symbolic link"),
    "zip-bomb": (lambda _: zip_bomb(), "decompression bomb"),
    "tar-gz-bomb": (lambda _: tar_gz_bomb(), "decompression bomb"),
    "not-an-archive": (lambda _: b"plainly not an archive" * 40, "not a zip, tar or tar.gz"),
    "empty": (lambda _: b"", "empty"),
    "truncated-tar-gz": (_truncated_tar_gz, "damaged or truncated"),
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_each_hostile_archive_is_a_4xx_and_leaves_nothing(client, service_home, tiny_folder,
                                                          case):
    build, needle = CORPUS[case]
    payload = build(tiny_folder)
    outside, tmp_before = _outside(service_home), set((service_home / "tmp").iterdir())
    started = time.monotonic()
    response = _upload(client, payload)
    elapsed = time.monotonic() - started
    assert 400 <= response.status_code < 500, response.text
    assert needle in response.json()["detail"], response.json()["detail"]
    # A bound, not a speed measurement: refusing must not take the unpacking child's limits.
    # 10,001 real one-file class folders are unpacked and linted before the class count is
    # known, so that case gets more room on a loaded 2-core machine.
    bound = 60 if case == "too-many-classes" else 30
    assert elapsed < bound, f"{case} took {elapsed:.1f} s to refuse"
    assert _outside(service_home) == outside, "something was written outside the data dir"
    assert _leftovers(service_home) == []
    assert set((service_home / "tmp").iterdir()) == tmp_before
    assert client.get("/healthz").status_code == 200


def test_reports_of_refused_datasets_say_why(client):
    response = _upload(client, _many_classes())
    assert response.status_code == 422
    error = response.json()["report"]["errors"][0]
    assert error["code"] == "too_many_classes" and error["count"] == 10_001
    assert len(error["items"]) == 20
    response = _upload(client, _dot_manifest_row())
    assert response.status_code == 422
    rows = next(w for w in response.json()["report"]["warnings"] if w["code"] == "manifest_rows")
    assert rows["items"] == [{"row": "labels.csv line 2",
                              "reason": "path '.' does not name a file"}]


def test_the_pathological_pax_header_is_refused_fast(client):
    started = time.monotonic()
    response = _upload(client, pax_digits_tar(1 << 20), filename="digits.tar")
    assert response.status_code == 422
    assert time.monotonic() - started < 5


def test_the_api_keeps_answering_while_hostile_archives_are_checked(client, service_home):
    payloads = [deep_tar_folders(), chained_headers_tar(400), tar_gz_bomb(), deep_zip(),
                pax_digits_tar(60_000), zip_bomb()]
    latencies = []
    with ThreadPoolExecutor(len(payloads)) as pool:
        uploads = [pool.submit(_upload, client, payload) for payload in payloads]
        while not all(u.done() for u in uploads):
            started = time.monotonic()
            assert client.get("/healthz").status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)
    assert [u.result().status_code for u in uploads] == [422] * len(payloads)
    assert max(latencies, default=0) < 2
    assert _leftovers(service_home) == []


def test_a_good_upload_still_works_after_the_corpus(client, tiny_folder, service_home):
    response = _upload(client, tar_folder(tiny_folder, mode="w"), filename="ok.tar")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["num_images"] == 36 and body["report"]["ok"]
    assert body["size_bytes"] == sum(p.stat().st_size for p in tiny_folder.rglob("*.png"))
    assert client.delete(f"/v1/datasets/{body['id']}").status_code == 204
    assert _leftovers(service_home) == []


# An archive of 200,000 empty files named like images (about 20 MB zipped, 1.5 MB as a
# tar.gz) once took about 50 s to refuse: every entry was unpacked, listed and opened.


def test_200000_empty_files_in_a_tar_gz_are_refused_as_the_headers_stream(client,
                                                                           service_home):
    response = _upload(client, tar_of_empty_files(200_000), filename="empty.tar.gz")
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    # The check stopped the stream at the allowance, 10,000 entries in, not 200,000.
    assert detail.startswith("10001 of the first 10001 entries cannot be images: 10001 files "
                             "under 24 bytes"), detail
    assert "refused before the rest was unpacked" in detail
    assert _leftovers(service_home) == []


@pytest.fixture(scope="module")
def roomy_api(tmp_path_factory) -> Iterator[tuple[httpx.Client, Path]]:
    """An API of its own that takes uploads of 32 MB (the shared stack's take 8)."""
    home = tmp_path_factory.mktemp("roomy-home")
    with Stack(home, env={"FTUNE_MAX_UPLOAD_MB": "32", "FTUNE_RATE_UPLOADS": "1000/minute"},
               log_dir=home) as stack:
        stack.start_redis()
        url = stack.start_api()
        key = make_key(f"sqlite:///{home / 'ftune.db'}", role=Role.ADMIN)
        with key.client(url, timeout=300) as http:
            yield http, home


def test_200000_empty_files_in_a_zip_are_refused_before_anything_is_unpacked(roomy_api):
    http, home = roomy_api
    payload = zip_of_empty_files(200_000)
    assert 16 << 20 < len(payload) < 32 << 20
    response = _upload(http, payload)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail.startswith("200000 of the archive's 200000 entries cannot be images: 200000 "
                             "files under 24 bytes (too small for any image), 0 folders"), detail
    assert "counted in the zip's central directory: nothing was unpacked" in detail
    assert _leftovers(home) == []


def test_a_dataset_with_some_clutter_is_still_accepted(client, tiny_folder, tmp_path):
    """What real archives carry: Finder's files, __MACOSX copies, an empty README, folders."""
    folder = tmp_path / "cluttered"
    shutil.copytree(tiny_folder, folder)
    for path in sorted(folder.rglob("*.png")):
        copy = folder / "__MACOSX" / path.parent.relative_to(folder) / f"._{path.name}"
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(b"\0" * 4096)
    (folder / ".DS_Store").write_bytes(b"\0" * 6148)
    (folder / "README.md").write_bytes(b"")
    for kind, payload in (("zip", zip_folder(folder)), ("tar.gz", tar_folder(folder))):
        response = _upload(client, payload, filename=f"cluttered.{kind}")
        assert response.status_code == 201, response.text
        assert response.json()["num_images"] == 36
        assert client.delete(f"/v1/datasets/{response.json()['id']}").status_code == 204
