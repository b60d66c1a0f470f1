"""Engine and session factory; SQLite tuned for an API and workers writing at once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


def normalize_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` (what users and platforms write) use psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


DEFAULT_POOL_TIMEOUT_S = 10.0


def make_engine(url: str, pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S) -> Engine:
    """``pool_timeout_s``: how long a request waits for a pooled connection before giving up
    (the API answers 503 with Retry-After then, see ``errors``)."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_timeout=pool_timeout_s,
                             connect_args={"connect_timeout": 5}
                             if parsed.get_backend_name() == "postgresql" else {})
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_timeout=pool_timeout_s,
                           connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        # WAL lets the API read while a worker writes; busy_timeout waits instead of failing.
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


class Database:
    """The engine plus a session factory; one per process.

    ``prepare`` runs once, before the first session: the API upgrades the schema there, so a
    database that was down at start-up is upgraded when it first answers."""

    def __init__(self, url: str, *, prepare: Callable[[Engine], object] | None = None,
                 pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S) -> None:
        self.url = url
        self.engine = make_engine(url, pool_timeout_s)
        self._prepare = prepare
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def prepare(self) -> None:
        if self._prepare is not None:
            self._prepare(self.engine)
            self._prepare = None

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        self.prepare()
        with self.sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        self.engine.dispose()
