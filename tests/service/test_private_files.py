"""The data directory is private to the service's user, whatever umask it was started under:
the folder itself 0700 (an existing one is tightened), and everything the processes create in
it, the database, uploaded datasets and trained models included, 0600 files and 0700 folders.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from ftune.processes import ftune_command, start_ftune_up
from ftune.testing.archives import zip_folder
from tests.service.conftest import wait_for_job

QUICK = {"image_size": 32, "epochs": 1, "batch_size": 12, "preset": "fast"}


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """Processes started inside inherit ``mask``, as from a shell with the usual 022."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _readable_by_others(home: Path) -> list[str]:
    found = []
    for path in [home, *home.rglob("*")]:
        mode = path.lstat().st_mode
        if not stat.S_ISLNK(mode) and mode & 0o077:
            found.append(f"{path.relative_to(home.parent)} {stat.filemode(mode)}")
    return found


def test_ftune_up_keeps_its_data_directory_private(tmp_path, tiny_folder):
    home = tmp_path / "home"
    home.mkdir(mode=0o755)  # as an older release left it
    os.chmod(home, 0o755)
    with umask(0o022), start_ftune_up(home, env={"FTUNE_AUTH": "off"}) as up:
        with httpx.Client(base_url=up.url, timeout=120) as http:
            upload = http.post("/v1/datasets", files={"file": ("t.zip", zip_folder(tiny_folder))},
                               params={"dedupe": "false"})
            assert upload.status_code == 201, upload.text
            job = http.post("/v1/jobs", json={"dataset_id": upload.json()["id"], "spec": QUICK})
            assert job.status_code == 202, job.text
            done = wait_for_job(http, job.json()["id"], timeout_s=240)
            assert done["status"] == "succeeded", done["error"]
            model_id = done["model_id"]
        written = {p.relative_to(home).as_posix() for p in home.rglob("*")}
        assert "ftune.db" in written
        assert any(p.startswith("blobs/datasets/") for p in written), sorted(written)
        assert any(p.startswith(f"blobs/models/{model_id}/") for p in written), sorted(written)
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        exposed = _readable_by_others(home)
        assert exposed == [], "\n".join(exposed)


def test_admin_commands_make_a_new_data_directory_private(tmp_path):
    home = tmp_path / "new" / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "FTUNE_HOME")}
    with umask(0o022):
        result = subprocess.run(ftune_command("db", "upgrade", "--home", str(home)), env=env,
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (home / "ftune.db").is_file()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    exposed = _readable_by_others(home)
    assert exposed == [], "\n".join(exposed)
