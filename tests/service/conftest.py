"""A real stack for the service tests: a private Redis, one Celery worker process and the API
process, sharing a fresh data directory. Started once per session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from service.launcher import find_redis_server, free_port
from tests.archives import zip_folder

MAX_UPLOAD_MB = 8  # small, so the 413 test needs only a few MB


def wait_until(check: Callable[[], object], timeout_s: float, what: str,
               interval_s: float = 0.2) -> object:
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # the thing we wait for may not answer yet
            last_error = exc
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}"
                         f"{f' (last error: {last_error})' if last_error else ''}")


def stop_process(process: subprocess.Popen, timeout_s: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """REDIS_URL when given, else a private redis-server on a free port."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    wait_until(client.ping, 20, "the private Redis")
    yield f"redis://127.0.0.1:{port}/0"
    stop_process(process)


@pytest.fixture(scope="session")
def service_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ftune-home")


@pytest.fixture(scope="session")
def service_env(redis_url, service_home) -> dict[str, str]:
    env = {**os.environ, "REDIS_URL": redis_url, "FTUNE_HOME": str(service_home),
           "FTUNE_CANCEL_POLL_S": "0.2", "FTUNE_WORKER_HEARTBEAT_S": "1",
           "FTUNE_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB), "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("DATABASE_URL", None)
    return env


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "service.cli", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="session")
def worker(service_env, service_home, redis_url) -> Iterator[subprocess.Popen]:
    """One real Celery worker process."""
    log = service_home / "worker.log"
    process = _start(["worker", "--name", "test-worker@localhost"], service_env, log)
    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: client.exists("ftune:worker:test-worker@localhost"), 60,
                   f"the worker to start (log: {log})")
        yield process
    finally:
        stop_process(process)


@pytest.fixture(scope="session")
def api_url(service_env, service_home) -> Iterator[str]:
    """The API as its own process, exactly as `ftune api` runs it."""
    port = free_port()
    log = service_home / "api.log"
    process = _start(["api", "--port", str(port)], service_env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, 60,
                   f"the API to start (log: {log})")
        yield url
    finally:
        stop_process(process)


@pytest.fixture(scope="session")
def client(api_url, worker) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=120) as http:
        yield http


@pytest.fixture(scope="session")
def tiny_dataset(client, tiny_folder) -> dict:
    """3 classes × 12 real images, uploaded once."""
    response = client.post("/v1/datasets", files={"file": ("tiny.zip", zip_folder(tiny_folder))},
                           data={"name": "tiny"})
    assert response.status_code == 201, response.text
    return response.json()


def wait_for_job(client: httpx.Client, job_id: str, timeout_s: float = 300,
                 statuses: tuple[str, ...] = ("succeeded", "failed", "cancelled")) -> dict:
    def done() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_until(done, timeout_s, f"job {job_id} to reach {statuses}", interval_s=0.3)
