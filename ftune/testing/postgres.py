"""A private PostgreSQL cluster for tests: Debian's server binaries (``initdb``, ``pg_ctl``),
a temporary folder, a free port, stopped at the end.

The binaries refuse to run as root, so as root they run as the ``postgres`` user
(``runuser``) in a folder that user owns. When they are missing the error says what to
install; nothing is skipped silently.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ftune.processes import free_port

PG_ROOTS = ("/usr/lib/postgresql",)
SERVER_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """No way to run a private PostgreSQL here; the message says what to install."""


def find_server_binaries() -> Path:
    """The ``bin`` folder of the newest PostgreSQL server installed from Debian's packages."""
    found = sorted((p for root in PG_ROOTS for p in Path(root).glob("*/bin")
                    if (p / "initdb").is_file() and (p / "pg_ctl").is_file()),
                   key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if not found:
        raise PostgresUnavailable(
            "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql: "
            "install Debian's `postgresql` package (apt-get install postgresql; `make test` "
            "does it when run as root), or set FTUNE_TEST_PG_URL to a server whose user may "
            "create databases")
    return found[-1]


@dataclass
class PrivateCluster:
    """``with PrivateCluster() as cluster: cluster.url``."""

    folder: Path | None = None
    port: int = 0
    listen: str = "127.0.0.1"  # the address it listens on
    prefix: Sequence[str] = ()  # runs the server under this (a test host's network)

    def __enter__(self) -> PrivateCluster:
        self.bin = find_server_binaries()
        self.port = free_port() if not self.prefix else 5432  # a host's ports are its own
        self.folder = Path(tempfile.mkdtemp(prefix="ftune-pg-"))
        self._as_server_user = os.geteuid() == 0
        if self._as_server_user:
            try:
                account = pwd.getpwnam(SERVER_USER)
            except KeyError as exc:
                raise PostgresUnavailable(f"running as root, but there is no {SERVER_USER!r} "
                                          "user to run PostgreSQL as") from exc
            os.chown(self.folder, account.pw_uid, account.pw_gid)
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", SERVER_USER, "-A", "trust",
                  "--no-sync", "-E", "UTF8")
        assert self.folder is not None
        if self.listen != "127.0.0.1":  # clients on the listening address's own network
            hba = self.data / "pg_hba.conf"
            hba.write_text(hba.read_text() + "\nhost all all samenet trust\n")
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses={self.listen} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l",
                  str(self.folder / "server.log"), "-w", "-t", "60", "start")

    def restart(self) -> None:
        """Stop the server (fast: connections are cut) and start it again, same data."""
        assert self.folder is not None
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"), "-m",
                  "fast", "-w", "-t", "60", "restart")

    @property
    def data(self) -> Path:
        assert self.folder is not None
        return self.folder / "data"

    @property
    def url(self) -> str:
        return f"postgresql://{SERVER_USER}@{self.listen}:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self._as_server_user:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        command = [*self.prefix, *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise PostgresUnavailable(f"{tool} failed ({result.returncode}): "
                                      f"{result.stderr.strip() or result.stdout.strip()}")

    def __exit__(self, *_: object) -> None:
        with contextlib.suppress(PostgresUnavailable, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the server (the URL's user may create databases); dropped
    afterwards. Yields its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from ftune.service.db.session import normalize_url

    name = f"ftune_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(normalize_url(server_url), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(normalize_url(server_url)).set(database=name).render_as_string(
            hide_password=False)
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
