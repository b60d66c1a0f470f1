"""``ftune remote`` against a real ``ftune up``: login, upload, submit and watch to the end (exit
0 on success, 1 otherwise), list, predict, download, alias, cancel; errors in plain words."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from ftune.processes import ftune_command

pytestmark = pytest.mark.processes


def remote(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*ftune_command("remote"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def env(up, tmp_path_factory) -> dict[str, str]:
    config = tmp_path_factory.mktemp("remote") / "remote.json"
    base = {**os.environ, "FTUNE_REMOTE_CONFIG": str(config)}
    base.pop("FTUNE_URL", None)
    base.pop("FTUNE_API_KEY", None)
    return base


def test_login_saves_a_private_file_that_later_commands_use(up, env):
    done = remote("login", "--url", up.url, "--key", up.admin_key, env=env)
    assert done.returncode == 0, done.stderr
    config = Path(env["FTUNE_REMOTE_CONFIG"])
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text()) == {"url": up.url, "api_key": up.admin_key}
    listed = remote("--json", "datasets", "list", env=env)
    assert listed.returncode == 0 and isinstance(json.loads(listed.stdout), list)


def test_a_wrong_key_is_refused_in_plain_words(up, env):
    done = remote("login", "--url", up.url, "--key", "ftk_wrong", env=env | {
        "FTUNE_REMOTE_CONFIG": env["FTUNE_REMOTE_CONFIG"] + ".other"})
    assert done.returncode == 1 and "HTTP 401" in done.stderr
    assert not Path(env["FTUNE_REMOTE_CONFIG"] + ".other").exists()


def test_upload_submit_watch_predict_download_and_alias(up, env, tiny_folder, tmp_path):
    env = env | {"FTUNE_URL": up.url, "FTUNE_API_KEY": up.admin_key}
    uploaded = remote("datasets", "upload", str(tiny_folder), "--name", "cli-tiny", env=env)
    assert uploaded.returncode == 0, uploaded.stderr
    dataset_id = uploaded.stdout.split()[1].rstrip(":")
    report = remote("datasets", "report", dataset_id, env=env)
    assert "36 images, 3 classes" in report.stdout and ": ok" in report.stdout

    watched = remote("jobs", "submit", dataset_id, "--set", "preset=fast", "--set",
                     "image_size=32", "--set", "epochs=2", "--watch", env=env)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    lines = watched.stdout.splitlines()
    assert any(line.split()[:2] == ["epoch", "stage"] for line in lines)  # the table's header
    assert "status: succeeded" in watched.stdout and "auto optimizer.lr = " in watched.stdout
    model_id = lines[-1].removeprefix("model: ")

    image = next(tiny_folder.rglob("*.png"))
    predicted = remote("models", "predict", model_id, str(image), "--top-k", "1", env=env)
    assert predicted.returncode == 0 and predicted.stdout.startswith(f"{image}: ")
    out = tmp_path / "model.onnx"
    downloaded = remote("models", "download", model_id, str(out), "--format", "onnx", env=env)
    assert downloaded.returncode == 0 and out.stat().st_size > 100_000
    aliased = remote("models", "alias", model_id, "staging", env=env)
    assert aliased.returncode == 0 and aliased.stdout.strip().endswith(model_id)
    models = remote("models", "list", env=env)
    assert "staging" in models.stdout and models.stdout.startswith("ID")


def test_watch_exits_non_zero_for_a_failed_job_and_a_bad_spec_names_its_field(up, env,
                                                                              tiny_folder):
    env = env | {"FTUNE_URL": up.url, "FTUNE_API_KEY": up.admin_key}
    uploaded = remote("--json", "datasets", "upload", str(tiny_folder), env=env)
    dataset_id = json.loads(uploaded.stdout)["id"]
    bad = remote("jobs", "submit", dataset_id, "--set", "epochs=0", env=env)
    assert bad.returncode == 1 and "HTTP 422" in bad.stderr
    assert "  spec.epochs: " in bad.stderr  # the field, on its own line
    # Valid, but no machine holds it: the worker's memory estimate refuses it.
    spec = {"image_size": 1024, "batch_size": 4096, "freeze": {"strategy": "none"}}
    failed = remote("jobs", "submit", dataset_id, "--spec", json.dumps(spec), "--watch",
                    env=env)
    assert failed.returncode == 1 and "status: failed" in failed.stdout, failed.stdout


def test_cancel_a_queued_or_running_job(up, env, tiny_folder):
    env = env | {"FTUNE_URL": up.url, "FTUNE_API_KEY": up.admin_key}
    uploaded = remote("--json", "datasets", "upload", str(tiny_folder), env=env)
    dataset_id = json.loads(uploaded.stdout)["id"]
    submitted = remote("--json", "jobs", "submit", dataset_id, "--set", "image_size=64",
                       "--set", "epochs=50", "--set", "freeze.strategy=none", env=env)
    job_id = json.loads(submitted.stdout)["id"]
    cancelled = remote("jobs", "cancel", job_id, env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    watched = remote("jobs", "watch", job_id, env=env)
    assert watched.returncode == 1 and "cancelled" in watched.stdout
    listed = remote("jobs", "list", "--status", "cancelled", env=env)
    assert job_id in listed.stdout


def test_a_sweep_from_the_command_line(up, env, tiny_folder):
    env = env | {"FTUNE_URL": up.url, "FTUNE_API_KEY": up.admin_key}
    uploaded = remote("--json", "datasets", "upload", str(tiny_folder), env=env)
    dataset_id = json.loads(uploaded.stdout)["id"]
    base = {"preset": "fast", "image_size": 32, "epochs": 2}
    space = {"optimizer.lr": {"log_uniform": [1e-3, 1e-1]}}
    started = remote("sweeps", "start", dataset_id, "--space", json.dumps(space), "--base",
                     json.dumps(base), "--trials", "2", "--parallelism", "1", "--pruner", "none",
                     "--watch", env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    sweep_id = started.stdout.split()[1].rstrip(":")
    assert "trial 1: succeeded" in started.stdout and "sweep: succeeded" in started.stdout
    shown = remote("sweeps", "show", sweep_id, env=env)
    assert shown.returncode == 0 and "trial 0: succeeded" in shown.stdout
    promoted = remote("sweeps", "promote", sweep_id, "--alias", "cli-best", env=env)
    assert promoted.returncode == 0 and ":cli-best -> model " in promoted.stdout
    bad = remote("sweeps", "start", dataset_id, "--space", '{"nope": {"int": [1, 2]}}', env=env)
    assert bad.returncode == 1 and "  space.nope: " in bad.stderr
