"""Conditional writes: an UPDATE or DELETE whose WHERE carries the state it expects, and the
number of rows it changed, which tells whether this process won a race."""

from __future__ import annotations

from sqlalchemy import CursorResult, Delete, Update
from sqlalchemy.orm import Session


def rows_changed(session: Session, statement: Update | Delete) -> int:
    """Run ``statement``; how many rows it matched (0: the expected state was gone)."""
    result = session.execute(statement)
    # Session.execute is typed as returning a Result; DML returns a CursorResult, which
    # alone has rowcount.
    assert isinstance(result, CursorResult)
    return result.rowcount
