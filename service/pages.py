"""Cursor pagination: one response shape for every list, ``{"items": [...], "next_cursor"}``.

Lists are read newest first (or in a fixed order) by a sort column with the row's id as a
tie-break, ``limit`` rows at a time (default 100, at most 1000). ``next_cursor`` is null on
the last page; otherwise pass it back as ``?cursor=`` for the next one. A cursor is an
opaque token holding the last row's sort key (keyset pagination): a page costs one query
whatever its depth, and rows added meanwhile never shift a page or appear twice.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel, Field
from sqlalchemy import Select, TypeDecorator, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

from ftune.service.errors import InvalidInput

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_CURSOR_CHARS = 200

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="rows per page")]
Cursor = Annotated[str | None, Query(max_length=MAX_CURSOR_CHARS,
                                     description="next_cursor of the previous page")]

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null "
                                    "on the last one")


@dataclass(frozen=True)
class Keyset:
    """How a list is ordered: ``sort`` then ``tiebreak`` (unique), newest first by default."""

    sort: InstrumentedAttribute
    tiebreak: InstrumentedAttribute
    descending: bool = True

    def after(self, cursor: str) -> Any:
        """The condition for rows after the one ``cursor`` was made from."""
        sort_value, tie_value = self._decode(cursor)
        if self.descending:
            return or_(self.sort < sort_value,
                       and_(self.sort == sort_value, self.tiebreak < tie_value))
        return or_(self.sort > sort_value,
                   and_(self.sort == sort_value, self.tiebreak > tie_value))

    def order(self) -> tuple:
        if self.descending:
            return self.sort.desc(), self.tiebreak.desc()
        return self.sort.asc(), self.tiebreak.asc()

    def cursor_of(self, row: object) -> str:
        values = [_plain(getattr(row, self.sort.key)), _plain(getattr(row, self.tiebreak.key))]
        return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")

    def _decode(self, cursor: str) -> tuple[Any, Any]:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            sort_value, tie_value = json.loads(raw)
            return (_typed(sort_value, self.sort), _typed(tie_value, self.tiebreak))
        except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
            raise InvalidInput("cursor: not a next_cursor of this list; start again without "
                               "one") from None


def _plain(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else value


def _typed(value: object, column: InstrumentedAttribute) -> object:
    """The cursor's value as the column's Python type; ValueError when it is not one."""
    column_type = column.type
    if isinstance(column_type, TypeDecorator):
        column_type = column_type.impl_instance
    python_type = column_type.python_type
    if python_type is datetime and isinstance(value, str):
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            raise ValueError("naive time")
        return parsed
    if python_type is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if python_type is str and isinstance(value, str) and len(value) <= MAX_CURSOR_CHARS:
        return value
    raise ValueError(f"not a {python_type.__name__}")


def read_page(session: Session, query: Select, keyset: Keyset, *, limit: int,
              cursor: str | None) -> tuple[list, str | None]:
    """One page of ``query``'s rows and the cursor of the next page (None on the last)."""
    if cursor:
        query = query.where(keyset.after(cursor))
    rows = list(session.scalars(query.order_by(*keyset.order()).limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    return rows[:limit], keyset.cursor_of(rows[limit - 1])


def page_of_list(items: list[dict], key: str, *, limit: int, cursor: str | None
                 ) -> tuple[list[dict], str | None]:
    """The same paging over a short list held in memory, ordered by the unique ``key``."""
    ordered = sorted(items, key=lambda item: item[key])
    if cursor:
        try:
            after = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
            if not isinstance(after, str):
                raise TypeError
        except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
            raise InvalidInput("cursor: not a next_cursor of this list; start again without "
                               "one") from None
        ordered = [item for item in ordered if item[key] > after]
    if len(ordered) <= limit:
        return ordered, None
    last = json.dumps(ordered[limit - 1][key]).encode()
    return ordered[:limit], base64.urlsafe_b64encode(last).decode().rstrip("=")


def every_row(read: Callable[[str | None], tuple[list, str | None]]) -> Iterator:
    """All rows of a paged list, reading page after page (for command-line tools)."""
    cursor: str | None = None
    while True:
        rows, cursor = read(cursor)
        yield from rows
        if cursor is None:
            return
