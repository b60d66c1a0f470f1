"""``Idempotency-Key``, written once for every route that creates something (jobs, sweeps).

A key is per tenant and remembered with the SHA-256 of the request's body and the id of what
the first request made: the same key with the same body returns that id again, with another
body it is a 409. Two requests racing with one key both try to insert the key's row; the
primary key (tenant, key) lets one commit, and the loser answers with the winner's object.
Sweeps keep their keys under the prefix ``sweep:`` and jobs under none, so a job's key and
a sweep's meet only if a client sends a job key that itself starts with ``sweep:`` (a 409,
never another tenant's or another kind's object).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ftune.service.auth.principal import Principal
from ftune.service.db.session import Database
from ftune.service.db.tables import IdempotencyKey
from ftune.service.errors import Conflict, InvalidInput

MAX_KEY = 200  # idempotency_keys.key


def body_digest(body: dict) -> str:
    """The same JSON body, whatever its key order, gives the same digest."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


@dataclass(frozen=True)
class Created:
    """What a submission answers with: the object's id, and whether this request made it
    (False: an earlier request with the same key did)."""

    object_id: str
    new: bool


def create_once(db: Database, principal: Principal, *, key: str | None, prefix: str,
                body: dict, create: Callable[[Session], str]) -> Created:
    """Run ``create`` (which returns the new object's id) in a transaction, unless ``key``
    was used before by the caller's tenant: then return what that request made. Without a
    key, ``create`` always runs."""
    if key is None:
        with db.session() as session:
            return Created(create(session), new=True)
    stored, digest = _stored_key(key, prefix), body_digest(body)
    try:
        with db.session() as session:
            earlier = _earlier(session, principal, stored, digest)
            if earlier is not None:
                return Created(earlier, new=False)
            object_id = create(session)
            session.add(IdempotencyKey(tenant_id=principal.home_tenant, key=stored,
                                       body_sha256=digest, object_id=object_id))
    except IntegrityError:
        # A concurrent request with the same key committed first: its object is the answer.
        with db.session() as session:
            earlier = _earlier(session, principal, stored, digest)
        if earlier is None:  # not the key's row that clashed
            raise
        return Created(earlier, new=False)
    return Created(object_id, new=True)


def forget(session: Session, principal: Principal, *, key: str, prefix: str) -> None:
    """Let the key be used afresh (the object it made could not be started)."""
    row = session.get(IdempotencyKey, (principal.home_tenant, _stored_key(key, prefix)))
    if row is not None:
        session.delete(row)


def _stored_key(key: str, prefix: str) -> str:
    longest = MAX_KEY - len(prefix)
    if not key or len(key) > longest:
        raise InvalidInput(f"Idempotency-Key must be 1 to {longest} characters")
    return prefix + key


def _earlier(session: Session, principal: Principal, stored: str, digest: str) -> str | None:
    """The id an earlier request with this key made; 409 if that request's body differed."""
    seen = session.get(IdempotencyKey, (principal.home_tenant, stored))
    if seen is None:
        return None
    if seen.body_sha256 != digest:
        raise Conflict("Idempotency-Key was already used with a different request body")
    return seen.object_id
