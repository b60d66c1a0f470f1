"""The data disk keeps its reserve: uploads, jobs and predictions are refused with 507 when
it is down to FTUNE_MIN_FREE_DISK_MB, both before an upload is accepted and before it is
unpacked; nothing is stored and nothing is left behind."""

from __future__ import annotations

import io
import shutil
import zipfile
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from ftune.service.app import create_app
from ftune.service.settings import Settings

MB = 2**20


def _app(tmp_path, min_free_disk_mb: float) -> Iterator[TestClient]:
    app = create_app(Settings(home=tmp_path / "home", auth="off", min_free_disk_mb=min_free_disk_mb,
                              redis_url="redis://127.0.0.1:1/0"))
    with TestClient(app, base_url="http://127.0.0.1") as http:
        yield http


def _leftovers(tmp_path) -> list[str]:
    home = tmp_path / "home"
    return sorted(str(p.relative_to(home)) for folder in ("uploads", "datasets")
                  for p in (home / folder).iterdir())


def _zeros_zip(size: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("cat/blank.png", b"\0" * size)
        archive.writestr("dog/blank.png", b"\0" * 10)
    return buffer.getvalue()


@pytest.fixture
def full_disk(tmp_path) -> Iterator[TestClient]:
    yield from _app(tmp_path, min_free_disk_mb=1e12)  # more than any disk: always "full"


def test_uploads_and_jobs_are_refused_before_anything_is_written(full_disk, tmp_path):
    response = full_disk.post("/v1/datasets", files={"file": ("d.zip", _zeros_zip(100))})
    assert response.status_code == 507
    assert "FTUNE_MIN_FREE_DISK_MB" in response.json()["detail"]
    assert int(response.headers["Retry-After"]) > 0
    assert _leftovers(tmp_path) == []
    assert full_disk.get("/v1/datasets").status_code == 200  # reading still works
    job = full_disk.post("/v1/jobs", json={"dataset_id": "0" * 32, "spec": {}})
    assert job.status_code == 507


def test_an_archive_unpacking_past_the_reserve_is_refused(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    # 20 MB above the reserve: the 60 kB upload passes, its 60 MB of contents cannot.
    for http in _app(tmp_path, min_free_disk_mb=(free - 20 * MB) / MB):
        response = http.post("/v1/datasets", files={"file": ("d.zip", _zeros_zip(60 * MB))})
        assert response.status_code == 507, response.text
        assert response.json()["detail"].startswith("unpacking the upload refused")
        assert _leftovers(tmp_path) == []
        assert http.get("/v1/datasets").json() == {"items": [], "next_cursor": None}
