"""Deleting objects with their rows, so that no row points at a missing object and no object
outlives its row for long.

The caller adds the object's prefixes with ``schedule`` in the transaction that deletes its
rows; once that has committed, ``remove`` deletes them from the store. A prefix whose delete
fails (the store is down, the process dies) stays in ``blob_deletions`` and the API's upkeep
retries it (``remove`` with no prefixes) until it is gone.

A writer that stores objects before their row exists (a worker's model bundle, an upload's
images) first ``hold``s their prefix: scheduled, due ``WRITE_HOLD_S`` later. The transaction
that records the row calls ``release``; a writer killed between the two leaves a hold that
comes due and is removed like any deletion. Taking a hold back and the upkeep claiming a due
one are each one statement on the same row, so exactly one of them wins: a writer whose hold
was claimed does not record its row (``HoldLost``)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ftune.service.blobs.base import BlobStore
from ftune.service.db.session import Database
from ftune.service.db.tables import BlobDeletion, utcnow

log = logging.getLogger(__name__)

BATCH = 200
# How long a writer has between holding a prefix and recording the row that owns it: far
# longer than storing a bundle or an upload's images takes; a writer that took longer finds
# its hold claimed and fails cleanly (HoldLost) instead of recording a row without objects.
WRITE_HOLD_S = 3600.0


class HoldLost(RuntimeError):
    """The upkeep claimed a writer's hold (it came due): its objects are being removed."""


def schedule(session: Session, prefixes: Iterable[str]) -> list[str]:
    """Record the prefixes to delete (in the caller's transaction); returns them. A hold on
    one of them becomes an ordinary deletion (due now)."""
    wanted = sorted(set(prefixes))
    if not wanted:
        return wanted
    known = set(session.scalars(select(BlobDeletion.prefix)
                                .where(BlobDeletion.prefix.in_(wanted))))
    session.execute(update(BlobDeletion).where(BlobDeletion.prefix.in_(known))
                    .values(not_before=None))
    session.add_all(BlobDeletion(prefix=p) for p in wanted if p not in known)
    session.flush()
    return wanted


def hold(session: Session, prefixes: Iterable[str], hold_s: float = WRITE_HOLD_S) -> list[str]:
    """Before storing objects whose row is not committed yet: their removal, due in
    ``hold_s`` unless ``release``d. Commits the session, so the hold outlives the writer."""
    wanted = sorted(set(prefixes))
    due = utcnow() + timedelta(seconds=hold_s)
    session.add_all(BlobDeletion(prefix=p, not_before=due) for p in wanted)
    session.commit()
    return wanted


def release(session: Session, prefixes: Iterable[str]) -> None:
    """In the transaction that records the objects' row: the hold is taken back. Raises
    ``HoldLost`` when the upkeep has claimed it (the transaction must not commit)."""
    for prefix in sorted(set(prefixes)):
        taken = session.execute(delete(BlobDeletion).where(
            BlobDeletion.prefix == prefix, BlobDeletion.not_before.is_not(None)))
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            raise HoldLost(f"the hold on {prefix} came due before its row was recorded")


def _claim_due_holds(db: Database) -> None:
    """Holds past due become ordinary deletions: one statement, so a writer's ``release``
    and this claim never both succeed."""
    with db.session() as session:
        session.execute(update(BlobDeletion).where(BlobDeletion.not_before <= utcnow())
                        .values(not_before=None))


def remove(db: Database, store: BlobStore, prefixes: Iterable[str] | None = None) -> int:
    """Delete the objects under those scheduled prefixes (or every pending one, oldest first,
    a batch at a time); how many prefixes are now gone. Never raises for the store: what
    fails stays scheduled, with its error. Holds not yet due are left alone."""
    if prefixes is None:
        _claim_due_holds(db)
    with db.session() as session:
        query = (select(BlobDeletion.prefix).where(BlobDeletion.not_before.is_(None))
                 .order_by(BlobDeletion.created_at).limit(BATCH))
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


def remove_committed(db: Database, store: BlobStore, prefixes: Iterable[str]) -> int:
    """``remove`` right after the delete that scheduled ``prefixes`` has committed: the
    request's answer is that delete's, so a database gone at this point (restarted a moment
    after the commit) is logged, not raised; the prefixes stay scheduled and the upkeep
    removes them. Raising would answer 503 for a delete that was done."""
    prefixes = list(prefixes)
    try:
        return remove(db, store, prefixes)
    except SQLAlchemyError as exc:
        log.warning("the delete of %s has committed; its objects are removed by the upkeep "
                    "(the database failed just after: %s)", prefixes, exc)
        return 0
