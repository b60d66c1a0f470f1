"""`ftune up` as users run it, and the compose file kept consistent with the code."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from ftune.cli import add_service_commands
from ftune.models.settings import EngineSettings
from ftune.processes import FtuneUp, start_ftune_up
from ftune.service.settings import Settings
from ftune.testing.archives import zip_folder
from ftune.testing.blobs import local_blob, tar_names
from tests.service.conftest import wait_for_job, wait_until

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent's bookkeeping remains.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


@pytest.mark.processes
def test_ftune_up_runs_everything_and_ctrl_c_stops_it(tmp_path):
    with start_ftune_up(tmp_path / "home", wait=False) as up:
        wait_until(up.state_file.exists, 90, "ftune up to write its state file")
        state = json.loads(up.state_file.read_text())
        assert set(state["children"]) == {"redis", "worker-1", "api"}
        assert state["redis_url"].startswith("redis://:")  # a password, then the host
        assert "@127.0.0.1:" in state["redis_url"]
        assert up.state_file.stat().st_mode & 0o777 == 0o600  # it holds that password
        assert up.key_file.stat().st_mode & 0o777 == 0o600
        key = up.operator_key()
        assert key.startswith("ftk_") and len(key) >= 40
        health = up.wait_healthy(60)
        assert health["status"] == "ok" and health["auth"].startswith("on")
        assert (up.home / "ftune.db").is_file()  # SQLite in the data directory by default
        url = f"{up.url}/v1/jobs"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 200

        code = up.stop(90)
    output = up.output()
    assert code == 0, output
    assert "ftune is up" in output
    assert key in output and str(up.key_file) in output  # printed once
    assert not [name for name, pid in state["children"].items() if _alive(pid)]
    assert not up.state_file.exists()


def _start_up(home: Path) -> FtuneUp:
    return start_ftune_up(home, env={"FTUNE_CANCEL_POLL_S": "0.2"})


def _stop_up(up: FtuneUp) -> str:
    code = up.stop()
    assert code == 0, up.output()
    return up.output()


@pytest.mark.processes
def test_stopping_ftune_up_hands_a_running_job_back_to_resume_later(tmp_path, tiny_folder):
    home = tmp_path / "home"
    up = _start_up(home)
    try:
        http = up.operator_client()
        dataset = http.post("/v1/datasets",
                            files={"file": ("t.zip", zip_folder(tiny_folder))}).json()
        spec = {"image_size": 64, "epochs": 12, "batch_size": 12, "seed": 3,
                "freeze": {"strategy": "none"}, "early_stopping": {"patience": 100}}
        job = http.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": spec}).json()
        wait_until(lambda: len(http.get(f"/v1/jobs/{job['id']}").json()["metrics"]) >= 2, 180,
                   "two finished epochs")
        before = http.get(f"/v1/jobs/{job['id']}").json()["metrics"]
    finally:
        output = _stop_up(up)
    with sqlite3.connect(home / "ftune.db") as db:
        status, epoch = db.execute("SELECT status, epoch FROM jobs WHERE id = ?",
                                   (job["id"],)).fetchone()
    assert status == "queued", output  # handed back, not lost and not stuck "running"
    assert 2 <= epoch < 12
    stored = local_blob(home, f"jobs/{job['id']}/checkpoints/attempt-0001.tar")
    assert "checkpoint.pt" in tar_names(stored)

    up = _start_up(home)  # same data dir: the job waits in the database
    try:
        http = up.operator_client()
        done = wait_for_job(http, job["id"], timeout_s=300)
    finally:
        output = _stop_up(up)
    assert done["status"] == "succeeded", done["error"]
    assert [row["epoch"] for row in done["metrics"]] == list(range(1, 13))  # each epoch once
    assert done["attempts"] == 2
    # Resumed, not restarted: epochs reported before the stop were not run again.
    assert done["metrics"][: len(before)] == before
    assert "resumes from its last checkpoint" in output
    assert "operator key: in" in output  # a later start says where the key is


# What the API and workers may be given besides FTUNE_* settings: the store's client reads
# the standard AWS variables.
STORE_VARIABLES = {"AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID",
                   "AWS_SECRET_ACCESS_KEY"}
FTUNE_SERVICES = ("api", "worker", "worker-remote")


def test_compose_file_matches_the_code():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"api", "worker", "worker-remote", "redis", "postgres", "minio", "minio-init"} <= set(
        services)

    import argparse

    parser = argparse.ArgumentParser()
    add_service_commands(parser.add_subparsers())
    known = {"DATABASE_URL", "REDIS_URL"} | STORE_VARIABLES | {
        f"FTUNE_{field.upper()}" for field in (*Settings.model_fields,
                                               *EngineSettings.model_fields)}
    for name in FTUNE_SERVICES:
        command = services[name]["command"]
        parser.parse_args(command)  # exits (fails the test) on an unknown command or option
        env = services[name]["environment"]
        assert set(env) <= known, set(env) - known
        assert {"DATABASE_URL", "REDIS_URL", "FTUNE_HOME", "FTUNE_STORAGE"} | STORE_VARIABLES \
            <= set(env)
        assert env["FTUNE_HOME"] in {v.split(":")[1] for v in services[name]["volumes"]}
        # Every blob in the bucket minio-init makes; settings accept the URL.
        assert env["FTUNE_STORAGE"].startswith("s3://ftune/")
        Settings(storage=env["FTUNE_STORAGE"])
        # Passwords and keys only from the untracked .env file, never written here.
        assert env["AWS_ACCESS_KEY_ID"] == "${S3_ACCESS_KEY}"
        assert env["AWS_SECRET_ACCESS_KEY"] == "${S3_SECRET_KEY}"
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["REDIS_URL"] == "redis://:${REDIS_PASSWORD}@redis:6379/0"
        assert env["DATABASE_URL"] == ("postgresql://ftune:${POSTGRES_PASSWORD}@postgres:5432/"
                                       "ftune")
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    # A worker on another machine: the same settings, only the control machine's address.
    local, remote = services["worker"]["environment"], services["worker-remote"]["environment"]
    assert set(local) == set(remote) and "remote" in services["worker-remote"]["profiles"]
    control = "${CONTROL_ADDRESS:-127.0.0.1}"
    for variable, host in (("DATABASE_URL", "postgres"), ("REDIS_URL", "redis"),
                           ("AWS_ENDPOINT_URL", "minio")):
        assert remote[variable] == re.sub(rf"(?<=[@/]){host}:", f"{control}:", local[variable])
    assert {k: v for k, v in remote.items() if not k.endswith("_URL")} == {
        k: v for k, v in local.items() if not k.endswith("_URL")}
    _assert_workers_share_no_volume_with_the_api(compose)
    _assert_the_store_is_made_by_minio_init(services)
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["worker"]["environment"]["FTUNE_DEVICE"] == "cuda"
    assert services["worker"]["stop_grace_period"] == "2m"
    assert services["worker"]["depends_on"]["api"] == {"condition": "service_healthy"}
    assert "healthcheck" in services["api"]
    assert "${REDIS_PASSWORD:?" in " ".join(services["redis"]["command"])
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(
        "${POSTGRES_PASSWORD:?")
    example = (ROOT / ".env.example").read_text()
    for variable in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "MINIO_ROOT_USER",
                     "MINIO_ROOT_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY"):
        assert f"{variable}=" in example, variable
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def _assert_workers_share_no_volume_with_the_api(compose: dict) -> None:
    """Workers reach the API's files only through the store: no volume in common."""
    def named(service: str) -> set[str]:
        return {v.split(":")[0] for v in compose["services"][service].get("volumes", [])}

    for worker in ("worker", "worker-remote"):
        assert not named("api") & named(worker), f"the API and {worker} share a volume"
        assert named(worker) <= set(compose["volumes"])
    assert named("api") <= set(compose["volumes"])


def _assert_the_store_is_made_by_minio_init(services: dict) -> None:
    minio, init = services["minio"], services["minio-init"]
    assert minio["image"].startswith("minio/minio") and "healthcheck" in minio
    assert minio["environment"]["MINIO_ROOT_PASSWORD"].startswith("${MINIO_ROOT_PASSWORD:?")
    assert init["image"].startswith("minio/mc")
    assert init["depends_on"]["minio"] == {"condition": "service_healthy"}
    script = " ".join(init["command"])
    assert "mb --ignore-existing root/ftune" in script  # the bucket FTUNE_STORAGE names
    # ftune's key may do what the S3 backend does (HEAD is GetObject; multipart is PutObject
    # and AbortMultipartUpload), on that bucket only.
    for action in ("ListBucket", "GetObject", "PutObject", "DeleteObject",
                   "AbortMultipartUpload"):
        assert f'"s3:{action}"' in script, action
    assert set(re.findall(r"arn:aws:s3:::[\w*/-]+", script)) == {"arn:aws:s3:::ftune",
                                                                "arn:aws:s3:::ftune/*"}
    assert services["api"]["depends_on"]["minio-init"] == {
        "condition": "service_completed_successfully"}


def test_dockerfile_installs_from_the_locks_as_a_non_root_user():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["ftune"]' in dockerfile and "FTUNE_HOME=/data" in dockerfile
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base  # an exact release tag
    lines = dockerfile.splitlines()
    locks = next(i for i, line in enumerate(lines) if "--require-hashes -r requirements.lock"
                 in line)
    code = next(i for i, line in enumerate(lines) if line.startswith("COPY models"))
    assert locks < code, "dependencies must install in a layer before the code is copied"
    user = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")


def test_every_setting_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    variables = {f"FTUNE_{name.upper()}" for name in (*Settings.model_fields,
                                                      *EngineSettings.model_fields)
                 if name not in ("engine", "database_url", "redis_url")}
    missing = sorted(v for v in variables if f"`{v}`" not in readme and f"`{v}," not in readme)
    assert not missing, f"settings missing from the README's configuration table: {missing}"


@pytest.mark.processes
def test_a_worker_that_keeps_dying_never_takes_ftune_up_down(tmp_path):
    up = _start_up(tmp_path / "home")
    try:
        for _ in range(6):  # more than the old limit of 5 deaths a minute
            pid = json.loads(up.state_file.read_text())["children"]["worker-1"]
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda pid=pid: json.loads(up.state_file.read_text())["children"]
                       ["worker-1"] != pid, 30, "the worker to be restarted")
        assert up.process.poll() is None  # the launcher is still up
        assert httpx.get(f"{up.url}/healthz").status_code == 200
        up.wait_healthy(60)  # the restarted worker reports in
    finally:
        output = _stop_up(up)
    assert output.count("worker-1 exited with code -9; restarting it") == 6


def test_make_up_says_how_to_run_the_ftune_command():
    planned = subprocess.run(["make", "-n", "up", "shell"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    assert ".venv/bin/ftune" in planned and "make shell" in planned
    assert "--init-file .venv/bin/activate" in planned  # make shell: ftune on PATH
    readme = (ROOT / "README.md").read_text()
    assert ".venv/bin/ftune predict" in readme and "make shell" in readme
