"""Ids are made by the server (uuid4 hex). Anything that is not one is unknown, never a query
or a path."""

from __future__ import annotations

import re
import uuid

_ID = re.compile(r"[0-9a-f]{32}")


def new_id() -> str:
    return uuid.uuid4().hex


def is_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None  # match would let "…\n" through
