"""Alembic's environment: migrations run on the connection ``ftune.service.db.migrate``
hands over (under its lock), never on a URL read from a config file."""

from __future__ import annotations

from alembic import context

from ftune.service.db.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `ftune db upgrade` (ftune.service.db.migrate)")

context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite",  # SQLite: ALTER by copy
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
