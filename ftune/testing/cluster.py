"""The whole service spread over hosts that share nothing but the network (``Hosts``), as a
deployment with worker machines runs it:

- ``control``: PostgreSQL, Redis, an S3-compatible store (``moto_server``) and the API, each
  on its own port of the host's address;
- ``w1``, ``w2``, ...: one ``ftune worker`` each, with its own data directory (its cache) in
  its private ``/tmp``, reaching the others by address only.

Every process gets only ``DATABASE_URL``, ``REDIS_URL``, ``FTUNE_STORAGE`` and the ``AWS_*``
variables, plus its own ``FTUNE_HOME``: nothing else is shared. The test reaches the API and
the store through ``Tunnel``s (``api``, ``s3_client``); its own keys are made on the control
host with ``ftune keys create``, as an operator would.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import redis

from ftune.processes import (
    find_redis_server,
    ftune_command,
    stop_process,
    wait_until,
)
from ftune.service.lifecycle.liveness import worker_key
from ftune.testing.forward import Tunnel, start_forwarder
from ftune.testing.hosts import HOST_HOME, Hosts
from ftune.testing.postgres import PrivateCluster
from ftune.testing.s3 import ACCESS_KEY, REGION, SECRET_KEY

API_PORT, REDIS_PORT, S3_PORT = 8000, 6379, 9000
S3_BACKEND_PORT = 9001  # moto itself, on the control host's loopback (see stop_store)
BUCKET = "ftune"
API_HOME = f"{HOST_HOME}/api"  # on the control host
WORKER_HOME = f"{HOST_HOME}/worker"  # on each worker host

# Fast heartbeats and polling: a cut-off worker's job is taken over in seconds, not minutes.
FAST = {"FTUNE_CANCEL_POLL_S": "0.5", "FTUNE_PROGRESS_INTERVAL_S": "0.5",
        "FTUNE_WORKER_HEARTBEAT_S": "1", "FTUNE_JOB_STALE_S": "6",
        "FTUNE_RECONCILE_INTERVAL_S": "2", "FTUNE_DISPATCH_INTERVAL_S": "1",
        "FTUNE_RETRY_BACKOFF_S": "2",
        "FTUNE_RATE_UPLOADS": "100000/minute", "FTUNE_RATE_JOBS": "100000/minute",
        "FTUNE_RATE_PREDICTIONS": "100000/minute", "FTUNE_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@dataclass
class Cluster:
    workdir: Path  # on the machine: PostgreSQL's folder, the logs, the tunnels' sockets
    workers: tuple[str, ...] = ("w1", "w2")
    env: dict[str, str] = field(default_factory=dict)  # added to every process's
    prefix: str = "store"  # of every key in the bucket
    started: list[subprocess.Popen] = field(default_factory=list)
    tunnels: list[Tunnel] = field(default_factory=list)
    worker_processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __enter__(self) -> Cluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hosts = Hosts("control", *self.workers).__enter__()
        try:
            self._start_services()
        except BaseException:
            self.__exit__()
            raise
        return self

    # -- what runs where ------------------------------------------------------------------
    @property
    def control(self) -> str:
        return self.hosts.address("control")

    @property
    def service_env(self) -> dict[str, str]:
        """What every ftune process is given: where the others are, nothing more."""
        return {"DATABASE_URL": self.pg.url, "REDIS_URL": f"redis://{self.control}:{REDIS_PORT}/0",
                "FTUNE_STORAGE": f"s3://{BUCKET}/{self.prefix}",
                "AWS_ENDPOINT_URL": f"http://{self.control}:{S3_PORT}", "AWS_REGION": REGION,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                **FAST, **self.env}

    def _log(self, name: str) -> IO[bytes]:
        return (self.workdir / f"{name}.log").open("ab")

    def _on_control(self, name: str, argv: list[str]) -> subprocess.Popen:
        """A service of the control host run from the machine's files (its folder is ours)."""
        with self._log(name) as log:
            process = subprocess.Popen([*self.hosts.in_network("control"), *argv], stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append(process)
        return process

    def tunnel(self, port: int, name: str) -> Tunnel:
        tunnel = Tunnel(self.hosts.in_network("control"), self.control, port,
                        self.workdir / f"{name}.sock")
        self.tunnels.append(tunnel)
        return tunnel

    def _start_services(self) -> None:
        self.pg = PrivateCluster(listen=self.control, prefix=self.hosts.in_network("control"))
        self.pg.__enter__()
        self.redis_process = self._start_redis()
        self.redis_tunnel = self.tunnel(REDIS_PORT, "redis")
        self.redis = redis.Redis(port=self.redis_tunnel.local_port, socket_connect_timeout=2)
        wait_until(self.redis.ping, 20, "Redis on the control host")
        self.s3_process = self._start_s3()
        self.s3_tunnel = self.tunnel(S3_PORT, "s3")
        wait_until(self._bucket_made, 60, "the store on the control host")
        self.api_process = self.hosts.popen(
            "control", ftune_command("api", "--host", self.control, "--port", str(API_PORT)),
            env={**self.service_env, "FTUNE_HOME": API_HOME}, stdout=self._log("api"),
            stderr=subprocess.STDOUT)
        self.api_tunnel = self.tunnel(API_PORT, "api")
        wait_until(lambda: httpx.get(f"{self.api_tunnel.url}/healthz", timeout=3).status_code
                   == 200, 90, "the API on the control host", abort=self._api_died)
        self.admin_key = self.make_key("--tenant", "default", "--role", "admin")
        for name in self.workers:
            self.start_worker(name)

    def _start_redis(self) -> subprocess.Popen:
        return self._on_control("redis", [
            find_redis_server(), "--port", str(REDIS_PORT), "--bind", self.control,
            "--protected-mode", "no", "--save", "", "--appendonly", "no",
            "--dir", str(self.workdir)])

    def _start_s3(self) -> subprocess.Popen:
        server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
        if server is None:
            raise RuntimeError("moto_server is not installed (pip install 'moto[server]')")
        process = self._on_control("s3", [server, "-H", "127.0.0.1", "-p",
                                          str(S3_BACKEND_PORT)])
        self.start_store()
        return process

    def start_store(self) -> None:
        """The store's endpoint answers (again). moto keeps its objects in memory, so an
        outage of the store is its endpoint going away, not the process: ``stop_store``
        stops the forwarder from the host's address to moto, and every client then finds
        the store down (connection refused) until this starts it again."""
        self.store_front = start_forwarder(f"tcp:{self.control}:{S3_PORT}",
                                           f"tcp:127.0.0.1:{S3_BACKEND_PORT}",
                                           prefix=self.hosts.in_network("control"))

    def stop_store(self) -> None:
        stop_process(self.store_front, 5)

    def restart_redis(self) -> None:
        """Redis stopped and started empty (it keeps nothing on disk here)."""
        stop_process(self.redis_process, 10)
        self.started.remove(self.redis_process)
        self.redis_process = self._start_redis()
        wait_until(self.redis.ping, 20, "Redis on the control host, restarted")

    def restart_postgres(self) -> None:
        self.pg.restart()

    def _bucket_made(self) -> bool:
        client = self.s3_client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=BUCKET)
        return True

    def _api_died(self) -> str | None:
        code = self.api_process.poll()
        return None if code is None else (f"the API exited with {code}; see "
                                          f"{self.workdir / 'api.log'}")

    def start_worker(self, name: str, *, wait: bool = True,
                     delay_ms: float = 0) -> subprocess.Popen:
        """The host's worker. ``delay_ms``: everything it sends to the control host and gets
        back is held that long each way (a slow link, made with forwarders on the host where
        the kernel has no netem: latency only, no loss)."""
        node = f"{name}@{name}"
        env = {**self.service_env, "FTUNE_HOME": WORKER_HOME}
        if delay_ms:
            env.update(self._slow_link(name, delay_ms))
        process = self.hosts.popen(name, ftune_command("worker", "--name", node), env=env,
                                   stdout=self._log(name), stderr=subprocess.STDOUT)
        self.worker_processes[name] = process
        if wait:
            wait_until(lambda: self.redis.exists(worker_key(node)), 120,
                       f"the worker on {name}",
                       abort=lambda: None if process.poll() is None else
                       f"the worker on {name} exited; see {self.workdir / (name + '.log')}")
        return process

    def _slow_link(self, name: str, delay_ms: float) -> dict[str, str]:
        """Forwarders on the host's loopback to each control service, ``delay_ms`` each way;
        the variables that send the worker through them."""
        local = {}
        for port in (5432, REDIS_PORT, S3_PORT):
            self.started.append(start_forwarder(
                f"tcp:127.0.0.1:{port}", f"tcp:{self.control}:{port}",
                prefix=self.hosts.in_network(name), delay_ms=delay_ms))
            local[port] = f"127.0.0.1:{port}"
        return {"DATABASE_URL": self.pg.url.replace(f"{self.control}:5432", local[5432]),
                "REDIS_URL": f"redis://{local[REDIS_PORT]}/0",
                "AWS_ENDPOINT_URL": f"http://{local[S3_PORT]}"}

    def stop_worker(self, name: str) -> None:
        """Stop the host's worker as an operator would (SIGTERM: a running job is handed
        back)."""
        process = self.worker_processes.pop(name)
        stop_process(process, 60)

    # -- using ----------------------------------------------------------------------------
    def make_key(self, *args: str) -> str:
        """A new API key, made on the control host (``ftune keys create ARGS``)."""
        result = self.hosts.run("control", ftune_command("keys", "create", *args),
                                env={**self.service_env, "FTUNE_HOME": API_HOME},
                                timeout_s=60)
        return result.stdout.strip().splitlines()[-1]

    def client(self, key: str | None = None, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.api_tunnel.url, timeout=timeout,
                            headers={"Authorization": f"Bearer {key or self.admin_key}"})

    def s3_client(self) -> Any:  # boto3 clients are built at run time, untyped
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.s3_tunnel.url, region_name=REGION,
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def stored_keys(self, prefix: str = "") -> list[str]:
        """Every key in the store under ``prefix`` (without the deployment's own prefix)."""
        client, base = self.s3_client(), f"{self.prefix}/"
        found = []
        for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=BUCKET, Prefix=base + prefix):
            found += [item["Key"][len(base):] for item in page.get("Contents", [])]
        return found

    def host_path(self, host: str, path: str) -> Path:
        """A path on ``host`` (under its /tmp) as the machine sees it."""
        return self.hosts.tmp_dir(host) / Path(path).relative_to("/tmp")

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- teardown -------------------------------------------------------------------------
    def __exit__(self, *_: object) -> None:
        for tunnel in self.tunnels:
            with contextlib.suppress(Exception):
                tunnel.close()
        for process in [*self.worker_processes.values(), getattr(self, "store_front", None),
                        *self.started]:
            if process is None:
                continue
            with contextlib.suppress(Exception):
                stop_process(process, 10)
        if hasattr(self, "pg"):
            self.pg.__exit__()
        self.hosts.__exit__(None, None, None)
