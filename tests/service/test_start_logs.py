"""Start-up logs warn only about what an operator should look at: creating a new database is
routine (INFO), changing the schema of an existing one is not (WARNING)."""

from __future__ import annotations

import logging

from ftune.service.app import create_app
from ftune.service.db import migrate
from ftune.service.db.session import make_engine
from ftune.service.settings import Settings

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"  # building the app does not connect to it


def test_a_fresh_start_creates_the_database_without_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        create_app(Settings(home=tmp_path, redis_url=UNREACHABLE_REDIS))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []
    created = f"created the database at revision {migrate.head_revision()}"
    assert created in [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]


def test_upgrading_an_existing_database_is_still_a_warning(tmp_path, caplog):
    engine = make_engine(f"sqlite:///{tmp_path / 'ftune.db'}")
    try:
        migrate.upgrade(engine, migrate.BASELINE)
        with caplog.at_level(logging.INFO):
            migrate.upgrade(engine)
    finally:
        engine.dispose()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"database upgraded from revision {migrate.BASELINE} "
                        f"to {migrate.head_revision()}"]
