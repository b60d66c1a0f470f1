"""Rows numbered 1, 2, 3 ... within a scope (a job's events, a tenant's audit log), so that an
id a client sees says nothing about other scopes' rows.

Each number is the scope's highest plus one, computed inside the INSERT itself, and a unique
constraint on (scope, number) makes two writers that picked the same one safe: SQLite runs
the statement under its write lock, so the number is always free there; on PostgreSQL the
second writer waits for the first to commit, ``ON CONFLICT DO NOTHING`` then inserts nothing
(no error, so the caller's transaction goes on), and the next try sees the committed row.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

# Each retry means another writer committed a number of this scope meanwhile.
MAX_TRIES = 100


class NumberingError(RuntimeError):
    """Writers of one scope kept taking every number first (never seen in practice)."""


def insert_numbered(session: Session, entity: type[Any], scope: str, number: str,
                    values: dict[str, Any]) -> int:
    """Insert ``values`` as a row of the mapped class ``entity`` whose column ``number`` is
    the next within rows with the same ``scope`` column value (nulls are one scope); returns
    that number."""
    table = entity.__table__
    scope_column, number_column = table.c[scope], table.c[number]
    scope_value = values[scope]
    same_scope = (scope_column.is_(None) if scope_value is None
                  else scope_column == scope_value)
    next_number = (select(func.coalesce(func.max(number_column), 0) + 1)
                   .where(same_scope).scalar_subquery())
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = (insert(table).values({**values, number: next_number})
                 .on_conflict_do_nothing().returning(number_column))
    for _ in range(MAX_TRIES):
        assigned = session.execute(statement).scalar()
        if assigned is not None:
            return int(assigned)
    raise NumberingError(f"no free number in {table.name} for {scope}={scope_value!r} after "
                         f"{MAX_TRIES} tries")

