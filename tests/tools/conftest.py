"""One real ``ftune up`` (private Redis, one worker, SQLite) for the people's tools: the Python
client, ``ftune remote`` and the light install, which all talk to it over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ftune.processes import free_port, ftune_command, wait_until
from ftune.service.auth.principal import Role
from ftune.testing.access import make_key


@dataclass(frozen=True)
class Up:
    url: str
    home: Path
    admin_key: str  # an admin of tenant "tools"
    member_key: str
    log: Path  # what ftune up and its processes printed (JSON log lines: FTUNE_LOG_FORMAT)


@pytest.fixture(scope="session")
def up(tmp_path_factory) -> Iterator[Up]:
    home = tmp_path_factory.mktemp("up") / "home"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["FTUNE_CANCEL_POLL_S"] = "0.2"
    env["FTUNE_LOG_FORMAT"] = "json"
    log_path = home.parent / "up.log"
    log = log_path.open("wb")
    process = subprocess.Popen([*ftune_command("up"), "--port", str(port), "--home", str(home)],
                               env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/healthz").json()["workers"] == 1, 120,
                   "ftune up to be ready")
        database = f"sqlite:///{home / 'ftune.db'}"
        admin = make_key(database, role=Role.ADMIN, tenant="tools")
        member = make_key(database, role=Role.MEMBER, tenant="tools")
        yield Up(url, home, admin.key, member.key, log_path)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
