"""The soak's own stack, its processes restartable one at a time: a private Redis (kept in
memory, so a restart empties it), the API on a fixed port, workers, and SQLite in the data
directory or a private PostgreSQL cluster."""

from __future__ import annotations

import contextlib
import shutil
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import redis

from ftune.processes import Child, LaunchError, Stack, free_port, wait_until
from ftune.service.auth.principal import Role
from ftune.testing.access import Key, make_key
from ftune.testing.cluster import FAST
from ftune.testing.postgres import PrivateCluster

T = TypeVar("T")
REDIS_PASSWORD = "soak-redis-password"
# The disk-full fault fills this much (plus a little) of the disk: the reserve is set this far
# below what is free at start, so only the fault's ballast crosses it. Other processes share
# the disk (a CI run beside the soak installs gigabytes): a quarter of what is free, up to
# 8 GB, leaves them room (the ballast is fallocated: no bytes are written).
DISK_SLACK_MB = 8192
DISK_LOW_MARGIN_MB = 256
SOAK_ENV = {
    **FAST,
    "FTUNE_JOB_STALE_S": "5", "FTUNE_RECONCILE_INTERVAL_S": "2",  # quick takeover and cleanup
    "FTUNE_HEADER_TIMEOUT_S": "3", "FTUNE_UPLOAD_IDLE_TIMEOUT_S": "5",  # slow clients
    "FTUNE_MAX_UPLOAD_MB": "160",  # the hostile corpus's bombs are checked, not refused by size
    "FTUNE_EXPORT_TIMEOUT_S": "120", "FTUNE_EXPORTS_AT_ONCE": "1",
    # A small cache of loaded models fills within minutes: growth after that is a leak, not
    # the cache reaching its bound.
    "FTUNE_PREDICTOR_CACHE_MB": "256",
    # The same for each process's cache on disk (fetched datasets and bundles, features):
    # at its default 20 GB it grew ~100 MB a minute and, well inside an hour, took the disk
    # below the API's reserve (DISK_SLACK_MB), so every upload was refused for disk.
    "FTUNE_CACHE_MB": "1024",
    # Timed lines: a violation's window is then found in every process's log.
    "FTUNE_LOG_FORMAT": "json",
}


@dataclass
class SoakStack:
    work: Path
    database: str = "sqlite"  # or "postgresql": a private cluster
    workers: int = 2
    env: dict[str, str] = field(default_factory=dict)

    def disk_low(self) -> bool:
        """The data disk is below the API's reserve (with a little margin: the answer was
        given a moment ago), whatever filled it: other processes share this disk."""
        free_mb = shutil.disk_usage(self.home).free / 2**20
        return free_mb < self.min_free_mb + DISK_LOW_MARGIN_MB

    def __enter__(self) -> SoakStack:
        self.home = self.work / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.pg: PrivateCluster | None = None
        if self.database == "postgresql":
            self.pg = PrivateCluster().__enter__()
        elif self.database != "sqlite":
            raise ValueError(f"--database: sqlite or postgresql, not {self.database!r}")
        free_mb = shutil.disk_usage(self.home).free // 2**20
        self.min_free_mb = max(0, free_mb - min(DISK_SLACK_MB, free_mb // 4))
        env = {**SOAK_ENV, "FTUNE_MIN_FREE_DISK_MB": str(self.min_free_mb), **self.env}
        if self.pg is not None:
            env["DATABASE_URL"] = self.pg.url
        self.stack = Stack(self.home, env=env, log_dir=self.work / "logs")
        # A child dies with the *thread* that started it (PR_SET_PDEATHSIG follows the thread,
        # not the process), so every restart runs on this one thread, which lives as long as
        # the stack: a fault thread that ends must not take the API or Redis with it.
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="soak-spawner")
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        self.stack.start_redis(password=REDIS_PASSWORD)
        self.api_port = free_port()
        self.api_url = self.stack.start_api(port=self.api_port)
        self.operator = make_key(self.database_url, role=Role.OPERATOR, name="soak-operator")
        self.worker_names = [f"soak-{i + 1}@localhost" for i in range(self.workers)]
        for name in self.worker_names:
            self.stack.start_worker(name)

    @property
    def database_url(self) -> str:
        return self.pg.url if self.pg is not None else f"sqlite:///{self.home / 'ftune.db'}"

    @property
    def sqlite_path(self) -> Path | None:
        return None if self.pg is not None else self.home / "ftune.db"

    def key(self, tenant: str, role: Role = Role.ADMIN) -> Key:
        return make_key(self.database_url, role=role, tenant=tenant, name="soak")

    # -- the processes, for the faults and the resource sampler ---------------------------
    def pids(self) -> dict[str, int]:
        """``api`` and each worker's name -> the pid of its process now."""
        return {("api" if c.name == "api" else c.name): c.pid
                for c in self.stack.children if c.name == "api" or c.name.startswith("worker")
                if c.alive()}

    def _worker(self, name: str) -> Child:
        return next(c for c in self.stack.named("worker") if c.name == f"worker-{name}")

    def _spawned(self, start: Callable[[], T]) -> T:
        return self._spawner.submit(start).result()

    def revive(self) -> list[str]:
        """Start again every process that exited by itself, as a supervisor (systemd,
        Kubernetes) would; returns what had exited, with its exit code."""
        return self._spawned(self._revive)

    def _revive(self) -> list[str]:
        revived = []
        for child in [c for c in self.stack.children if not c.alive()]:
            self.stack.children.remove(child)
            if child.name == "api":
                self.stack.start_api(port=self.api_port, wait=False)
            elif child.name.startswith("worker-"):
                self.stack.start_worker(child.name.removeprefix("worker-"), wait=False)
            else:  # Redis: the same configuration, port and password
                self.stack.spawn(child.name, child.command)
            revived.append(f"{child.name} (exit code {child.process.returncode})")
        return revived

    def wait_ready(self, timeout_s: float = 120) -> None:
        """Redis and the API answer again."""
        client = redis.Redis.from_url(self.stack.env["REDIS_URL"], socket_connect_timeout=1)
        wait_until(client.ping, timeout_s, "Redis")
        wait_until(lambda: httpx.get(f"{self.api_url}/healthz", timeout=3).status_code == 200,
                   timeout_s, "the API")

    def _tolerant(self, start: Callable[[], object]) -> None:
        """Waits for what ``start`` started even when another process died meanwhile (the
        stack's own wait gives up then): that one is revived first."""
        try:
            self._spawned(start)
        except LaunchError:
            self.revive()
            self.wait_ready()

    def kill_worker(self, name: str) -> None:
        """SIGKILL: its job is not handed back (the reconciler must take it over)."""
        self.stack.kill(self._worker(name), signal.SIGKILL)

    def start_worker(self, name: str) -> None:
        self._tolerant(lambda: self.stack.start_worker(name))

    def restart_api(self) -> None:
        """Stopped as an operator would (SIGTERM), started again on the same port."""
        self.stack.stop("api")
        self._tolerant(lambda: self.stack.start_api(port=self.api_port))

    def stop_redis(self) -> int:
        port = self.stack.redis_port
        self.stack.kill(self.stack.named("redis")[0], signal.SIGKILL)
        return port

    def start_redis(self, port: int) -> None:
        # Empty: nothing persisted.
        self._tolerant(lambda: self.stack.start_redis(port, password=REDIS_PASSWORD))

    def log(self, name: str) -> Path:
        return self.work / "logs" / f"{name}.log"

    def __exit__(self, *_: object) -> None:
        with contextlib.suppress(Exception):
            self.stack.stop_all()
        with contextlib.suppress(Exception):
            self._spawner.shutdown()
        if self.pg is not None:
            self.pg.__exit__()
