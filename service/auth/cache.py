"""Key lookups cached per API process, so authenticating costs a hash and a dict lookup.

An entry lives at most ``ttl_s`` (one second by default): a key revoked in one process stops
working in every other within that. Unknown keys are cached too, so guessing does not hammer
the database. "Last used" is written at most once a minute per key.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import select, update

from ftune.service.auth.keys import hash_key
from ftune.service.auth.principal import Principal, Role
from ftune.service.db.session import Database
from ftune.service.db.tables import ApiKey, utcnow

log = logging.getLogger(__name__)

MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class Lookup:
    principal: Principal | None  # None: the key does not work
    reason: str  # why not, for the 401
    valid_until: float  # time.monotonic()


class KeyCache:
    def __init__(self, db: Database, *, ttl_s: float = 1.0, touch_every_s: float = 60.0) -> None:
        self.db, self.ttl_s, self.touch_every_s = db, ttl_s, touch_every_s
        self._entries: OrderedDict[str, Lookup] = OrderedDict()
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()

    def cached(self, token: str) -> tuple[str, Lookup | None]:
        """The key's digest and its cached lookup, if still fresh (no I/O)."""
        digest = hash_key(token)
        with self._lock:
            found = self._entries.get(digest)
        if found is not None and found.valid_until > time.monotonic():
            return digest, found
        return digest, None

    def load(self, digest: str) -> Lookup:
        """Look the key up in the database and cache the answer."""
        with self.db.session() as session:
            key = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
            lookup = _lookup(key, self.ttl_s)
        with self._lock:
            self._entries[digest] = lookup
            self._entries.move_to_end(digest)
            while len(self._entries) > MAX_ENTRIES:
                self._entries.popitem(last=False)
        return lookup

    def due_for_touch(self, key_id: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._touched.get(key_id, -self.touch_every_s) < self.touch_every_s:
                return False
            self._touched[key_id] = now
            return True

    def touch(self, key_id: str) -> None:
        """Record that the key was used (coarsely: see ``due_for_touch``)."""
        try:
            with self.db.session() as session:
                session.execute(update(ApiKey).where(ApiKey.id == key_id)
                                .values(last_used_at=utcnow()))
        except Exception as exc:  # bookkeeping only: never fail a request for it
            log.warning("could not record the use of key %s: %s", key_id, exc)


def _lookup(key: ApiKey | None, ttl_s: float) -> Lookup:
    now = time.monotonic()
    if key is None:
        return Lookup(None, "unknown API key", now + ttl_s)
    if key.revoked_at is not None:
        return Lookup(None, "this API key was revoked", now + ttl_s)
    if key.expires_at is not None:
        left = (key.expires_at - utcnow()).total_seconds()
        if left <= 0:
            return Lookup(None, f"this API key expired at {key.expires_at.isoformat()}",
                          now + ttl_s)
        ttl_s = min(ttl_s, left)
    principal = Principal(Role(key.role), key.tenant_id, key.id, key.name)
    return Lookup(principal, "", now + ttl_s)
