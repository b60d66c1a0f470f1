"""A consistent copy of a live database, and bringing one back (``ftune backup`` and
``ftune restore``).

SQLite: the online backup API (``sqlite3.Connection.backup``) copies every page in one read
transaction, so the copy is one moment of the database while the API and workers go on
writing; a file copy of a live database could catch half a transaction.

PostgreSQL: ``pg_dump`` in the snapshot of a REPEATABLE READ transaction that this process
holds open (``pg_export_snapshot``), so the rows read here (which blobs to keep) and the dump
are the same moment. ``pg_dump`` rather than a dump of our own: it is PostgreSQL's own
consistent, complete format (sequences, constraints, indexes), and ``pg_restore`` brings it
back. It must be at least the server's major version (the ``postgresql-client`` package).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, create_engine, func, inspect, select, table
from sqlalchemy.engine import make_url

from ftune.service.db.session import normalize_url
from ftune.service.db.tables import Dataset, Job, TunedModel

SQLITE_FILE = "database.sqlite3"
POSTGRES_FILE = "database.pgdump"
PG_ROOTS = ("/usr/lib/postgresql",)  # Debian's packages put pg_dump of each version here


class SnapshotError(RuntimeError):
    """The database could not be copied or brought back; the message says why."""


@dataclass
class Contents:
    """What one snapshot holds: its schema revision, rows per table, and the objects whose
    blobs it refers to (dataset and model ids with the SHA-256 recorded on their rows)."""

    revision: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    datasets: dict[str, str | None] = field(default_factory=dict)
    models: dict[str, str | None] = field(default_factory=dict)
    jobs: list[str] = field(default_factory=list)


def database_kind(url: str) -> str:
    kind = make_url(normalize_url(url)).get_backend_name()
    if kind not in ("sqlite", "postgresql"):
        raise SnapshotError(f"backups support SQLite and PostgreSQL databases, not {kind}")
    return kind


def sqlite_path(url: str) -> Path:
    database = make_url(normalize_url(url)).database
    if not database or database == ":memory:":
        raise SnapshotError(f"not a SQLite database file: {url}")
    return Path(database)


def read_contents(connection: Connection) -> Contents:
    """Read in the caller's transaction, so it is the same moment as the copy."""
    contents = Contents(revision=MigrationContext.configure(connection).get_current_revision(),
                        counts=count_rows(connection))
    contents.datasets = dict(connection.execute(select(Dataset.id, Dataset.blob_sha256)).all())
    contents.models = dict(connection.execute(select(TunedModel.id, TunedModel.blob_sha256))
                           .all())
    contents.jobs = list(connection.scalars(select(Job.id)))
    return contents


def count_rows(connection: Connection) -> dict[str, int]:
    """Rows in each table (whatever the schema's revision)."""
    return {name: int(connection.scalar(select(func.count()).select_from(table(name))) or 0)
            for name in sorted(inspect(connection).get_table_names())}


def read_counts(url: str) -> dict[str, int]:
    engine = create_engine(normalize_url(url))
    try:
        with engine.connect() as connection:
            return count_rows(connection)
    finally:
        engine.dispose()


def copy_database(url: str, folder: Path) -> tuple[Path, Contents]:
    """A consistent copy of the live database at ``url`` in ``folder``, and what it holds."""
    if database_kind(url) == "sqlite":
        return _copy_sqlite(sqlite_path(url), folder / SQLITE_FILE)
    return _dump_postgres(url, folder / POSTGRES_FILE)


def _copy_sqlite(source: Path, target: Path) -> tuple[Path, Contents]:
    if not source.is_file():
        raise SnapshotError(f"no database at {source}")
    live = sqlite3.connect(source, timeout=30)
    copy = sqlite3.connect(target)
    try:
        live.backup(copy)  # every page in one step: one read transaction, one moment
    finally:
        copy.close()
        live.close()
    # What the copy holds is read from the copy, not the live database that moved on.
    engine = create_engine(f"sqlite:///file:{target}?mode=ro&uri=true")
    try:
        with engine.connect() as connection:
            contents = read_contents(connection)
    finally:
        engine.dispose()
    return target, contents


def _dump_postgres(url: str, target: Path) -> tuple[Path, Contents]:
    engine = create_engine(normalize_url(url))
    try:
        with (engine.connect().execution_options(isolation_level="REPEATABLE READ")
              as connection, connection.begin()):
            snapshot = connection.scalar(select(func.pg_export_snapshot()))
            contents = read_contents(connection)
            # The dump sees exactly this transaction's snapshot while it stays open.
            _run_pg("pg_dump", url, "--format=custom", "--no-owner", "--no-privileges",
                    f"--snapshot={snapshot}", f"--file={target}")
    finally:
        engine.dispose()
    return target, contents


def restore_database(kind: str, dump: Path, url: str) -> None:
    """Bring the copy back into the (empty) database at ``url``."""
    if kind == "sqlite":
        target = sqlite_path(url)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.restoring")
        shutil.copyfile(dump, partial)  # the backup is no live database: a plain copy
        partial.replace(target)
        return
    _run_pg("pg_restore", url, "--no-owner", "--no-privileges", "--exit-on-error",
            "--single-transaction", str(dump))


def is_empty(url: str) -> bool:
    """No tables yet (for PostgreSQL: what restore needs)."""
    engine = create_engine(normalize_url(url))
    try:
        with engine.connect() as connection:
            return not inspect(connection).get_table_names()
    finally:
        engine.dispose()


def _run_pg(program: str, url: str, *args: str) -> None:
    """Run a PostgreSQL client program on the database at ``url``; its credentials go in
    libpq's variables, never on a command line another user could read. The rest of the URL
    (its query too: ``sslmode``, a socket ``host``) goes as libpq's own URI, so the program
    connects as the service does."""
    parsed = make_url(normalize_url(url))
    env = dict(os.environ)
    if parsed.password is not None:
        env["PGPASSWORD"] = str(parsed.password)
    # (URL.set ignores password=None: _replace is how to drop it.)
    dbname = parsed._replace(drivername="postgresql", password=None).render_as_string(
        hide_password=False)
    done = subprocess.run([_pg_program(program), "--dbname", dbname, *args],
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SnapshotError(f"{program} failed (exit {done.returncode}): "
                            f"{done.stderr.strip()[-2000:]}")


def _pg_program(name: str) -> str:
    """On PATH, else the newest of Debian's versioned folders."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted((p for root in PG_ROOTS for p in Path(root).glob(f"*/bin/{name}")),
                      key=lambda p: int(p.parents[1].name) if p.parents[1].name.isdigit() else 0)
    if not versions:
        raise SnapshotError(f"{name} not found: a PostgreSQL backup needs the PostgreSQL "
                            "client programs (apt-get install postgresql-client) of at least "
                            "the server's major version")
    return str(versions[-1])
