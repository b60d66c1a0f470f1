"""Schema migrations with Alembic: upgrade under a lock, tell where a database stands, refuse
to run on one that is behind.

The API (``ftune api``, ``ftune up``) upgrades on start; workers and ``ftune serve`` only check,
so a release never runs against a schema it does not know. A database made before migrations
existed (tables from ``create_all``, no ``alembic_version``) is stamped with the baseline
revision, which is exactly that schema, and then upgraded.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"
# Tables the baseline creates; their presence without alembic_version means "made by create_all".
_BASELINE_MARKER = "jobs"
_PG_LOCK_KEY = 0x66747A6E  # any constant: the advisory lock shared by every ftune process


class SchemaError(RuntimeError):
    """The database's schema does not match this release; the message says what to run."""


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None, "the migrations folder has no revision"
    return head


def known_revisions() -> set[str]:
    return {s.revision for s in ScriptDirectory.from_config(_config()).walk_revisions()}


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, target: str = "head") -> tuple[str | None, str | None]:
    """Upgrade to ``target`` under a lock (two processes starting together don't race);
    returns the revisions before and after."""
    with (engine.connect() as connection, migration_lock(engine, connection),
          _sqlite_foreign_keys_off(connection)):
        before = MigrationContext.configure(connection).get_current_revision()
        if before is None and inspect(connection).has_table(_BASELINE_MARKER):
            log.warning("database made before migrations: marking it as revision %s", BASELINE)
            command.stamp(_config(connection), BASELINE)
            connection.commit()
            before = BASELINE
        command.upgrade(_config(connection), target)
        connection.commit()
        after = MigrationContext.configure(connection).get_current_revision()
    if before is None and after is not None:  # a new database: nothing an operator must know
        log.info("created the database at revision %s", after)
    elif before != after:  # an existing database changed: worth noticing in the logs
        log.warning("database upgraded from revision %s to %s", before, after)
    return before, after


def downgrade(engine: Engine, target: str) -> tuple[str | None, str | None]:
    """Go back to ``target`` (e.g. the previous release's revision) under the same lock."""
    with (engine.connect() as connection, migration_lock(engine, connection),
          _sqlite_foreign_keys_off(connection)):
        before = MigrationContext.configure(connection).get_current_revision()
        command.downgrade(_config(connection), target)
        connection.commit()
        after = MigrationContext.configure(connection).get_current_revision()
    return before, after


def require_current(engine: Engine) -> None:
    """Raise SchemaError unless the database is at this release's head revision."""
    current, head = current_revision(engine), head_revision()
    if current == head:
        return
    if current is None:
        raise SchemaError("the database has no ftune schema yet (or one from before "
                          "migrations); run `ftune db upgrade` first")
    if current not in known_revisions():
        raise SchemaError(f"the database is at revision {current}, which this release does "
                          f"not know (a newer release upgraded it); run the newer release, or "
                          f"downgrade the database with it to {head}")
    raise SchemaError(f"the database is at revision {current} but this release needs {head}; "
                      "run `ftune db upgrade`")


@contextlib.contextmanager
def _sqlite_foreign_keys_off(connection: Connection) -> Iterator[None]:
    """SQLite changes a table by copying it; foreign keys are checked once, at the end."""
    if connection.dialect.name != "sqlite":
        yield
        return
    connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    try:
        yield
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise SchemaError(f"the migration left rows with broken references: {broken[:5]}")
    finally:
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")


@contextlib.contextmanager
def migration_lock(engine: Engine, connection: Connection) -> Iterator[None]:
    """One migrating process at a time: an advisory lock on PostgreSQL, a file lock next to
    a SQLite database."""
    if engine.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
        connection.commit()  # the lock belongs to the session, not to this transaction
        try:
            yield
        finally:
            connection.rollback()
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK_KEY})
            connection.commit()
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(Path(database).with_name(Path(database).name + ".migrate.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
