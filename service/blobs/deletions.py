"""Deleting objects with their rows, so that no row points at a missing object and no object
outlives its row for long.

The caller adds the object's prefixes with ``schedule`` in the transaction that deletes its
rows; once that has committed, ``remove`` deletes them from the store. A prefix whose delete
fails (the store is down, the process dies) stays in ``blob_deletions`` and the API's upkeep
retries it (``remove`` with no prefixes) until it is gone."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from ftune.service.blobs.base import BlobStore
from ftune.service.db.session import Database
from ftune.service.db.tables import BlobDeletion

log = logging.getLogger(__name__)

BATCH = 200


def schedule(session: Session, prefixes: Iterable[str]) -> list[str]:
    """Record the prefixes to delete (in the caller's transaction); returns them."""
    wanted = sorted(set(prefixes))
    known = set(session.scalars(select(BlobDeletion.prefix)
                                .where(BlobDeletion.prefix.in_(wanted)))) if wanted else set()
    session.add_all(BlobDeletion(prefix=p) for p in wanted if p not in known)
    session.flush()
    return wanted


def remove(db: Database, store: BlobStore, prefixes: Iterable[str] | None = None) -> int:
    """Delete the objects under those scheduled prefixes (or every pending one, oldest first,
    a batch at a time); how many prefixes are now gone. Never raises for the store: what
    fails stays scheduled, with its error."""
    with db.session() as session:
        query = select(BlobDeletion.prefix).order_by(BlobDeletion.created_at).limit(BATCH)
        if prefixes is not None:
            query = query.where(BlobDeletion.prefix.in_(list(prefixes)))
        pending = list(session.scalars(query))
    done = 0
    for prefix in pending:
        try:
            store.delete_prefix(prefix)
        except Exception as exc:  # every backend's errors: retried by the next sweep
            log.warning("could not delete %s from the store (retried later): %s", prefix, exc)
            with db.session() as session:
                session.execute(update(BlobDeletion).where(BlobDeletion.prefix == prefix)
                                .values(attempts=BlobDeletion.attempts + 1,
                                        last_error=f"{type(exc).__name__}: {exc}"[:2000]))
            continue
        with db.session() as session:
            session.execute(delete(BlobDeletion).where(BlobDeletion.prefix == prefix))
        done += 1
    return done
