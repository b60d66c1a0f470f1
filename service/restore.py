"""``ftune restore SRC``: a backup (``service/backup.py``) back into an empty data directory.

Everything is checked before anything is written: the manifest, the database copy's and
every copied blob's size and SHA-256 (the first bad one is named), that the target data
directory and database are empty, and, for a backup that only listed its S3 objects, that
the store still holds each of them unchanged. Then the database is brought back and its
schema upgraded to this release's (Alembic), the blobs are stored, and jobs that were
running (or handed to a worker) at backup time are queued again through the job state
machine, to resume from their last checkpoint: nothing that was in flight is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select, update

from ftune.models.data.trees import remove_tree
from ftune.service.backup import object_head
from ftune.service.backup_manifest import (
    BLOBS,
    COPIED,
    BackupError,
    Manifest,
    read_manifest,
    verify_file,
)
from ftune.service.blobs.base import BlobStore
from ftune.service.db import migrate
from ftune.service.db.session import Database
from ftune.service.db.snapshot import (
    SnapshotError,
    database_kind,
    is_empty,
    read_counts,
    restore_database,
    sqlite_path,
)
from ftune.service.db.tables import Job
from ftune.service.db.writes import rows_changed
from ftune.service.events import status_event
from ftune.service.job_status import JobStatus
from ftune.service.lifecycle import transitions

REASON = "restored from a backup taken while it was {status}; it resumes from its checkpoint"


@dataclass
class Restored:
    manifest: Manifest
    revision: tuple[str | None, str | None]  # the schema before and after the upgrade
    requeued: list[str] = field(default_factory=list)


def restore_backup(source: Path, home: Path, database_url: str, store: BlobStore) -> Restored:
    """Restore the backup in ``source`` into the empty data directory ``home``, its database
    at ``database_url`` and its blobs into ``store``."""
    source = source.expanduser().resolve()
    manifest = read_manifest(source)
    _check_compatible(manifest, database_url)
    _check_target(home, database_url, manifest)
    _verify_files(manifest, source)
    if manifest.storage["mode"] != COPIED:
        _verify_listed(manifest, store)  # before anything is written
    home.mkdir(parents=True, exist_ok=True)
    try:
        return _bring_back(manifest, source, database_url, store)
    except BaseException:
        # It was empty: what is there now is ours, half made. (A PostgreSQL database keeps
        # what pg_restore wrote in its one transaction only if it committed.)
        for entry in list(home.iterdir()):
            remove_tree(entry)
        raise


def _bring_back(manifest: Manifest, source: Path, database_url: str,
                store: BlobStore) -> Restored:
    # The blobs first: without their rows they are only orphans, so a failure after them
    # leaves the database as empty as it was, and the restore can be run again.
    if manifest.storage["mode"] == COPIED:
        for entry in manifest.blobs:
            store.put_file(entry.key, source / BLOBS / entry.key)
    database = manifest.database
    try:
        restore_database(database["kind"], source / database["file"], database_url)
    except SnapshotError as exc:
        raise BackupError(str(exc)) from None
    counts = read_counts(database_url)
    if counts != manifest.counts:
        wrong = sorted(t for t in manifest.counts.keys() | counts.keys()
                       if counts.get(t) != manifest.counts.get(t))
        raise BackupError(f"the restored database's row counts differ from the manifest's "
                          f"(tables {wrong}): the backup is damaged")
    db = Database(database_url)
    try:
        revision = migrate.upgrade(db.engine)
        restored = Restored(manifest, revision, _requeue_in_flight(db))
    finally:
        db.dispose()
    return restored


def _check_compatible(manifest: Manifest, database_url: str) -> None:
    kind, target = manifest.database["kind"], database_kind(database_url)
    if kind != target:
        raise BackupError(f"the backup holds a {kind} database but the target is {target} "
                          f"(DATABASE_URL); restore it into a {kind} database")
    revision = manifest.database.get("schema_revision")
    if revision is not None and revision not in migrate.known_revisions():
        raise BackupError(f"the backup's schema revision {revision} is newer than this "
                          "release knows; restore it with the release that made it (or newer)")


def _verify_files(manifest: Manifest, source: Path) -> None:
    database = manifest.database
    verify_file(source / database["file"], int(database["size"]), database["sha256"],
                f"the database copy {database['file']}", root=source)
    if manifest.storage["mode"] != COPIED:
        return
    for entry in manifest.blobs:
        assert entry.sha256 is not None  # the manifest's check: copied blobs have one
        verify_file(source / BLOBS / entry.key, entry.size, entry.sha256,
                    f"the blob {entry.key}", root=source / BLOBS)


def _check_target(home: Path, database_url: str, manifest: Manifest) -> None:
    if home.exists() and (not home.is_dir() or any(home.iterdir())):
        first = next(iter(sorted(home.iterdir())), None) if home.is_dir() else None
        raise BackupError(f"the data directory {home} is not empty"
                          f"{f' (it holds {first.name})' if first else ''}; restore needs an "
                          "empty one (a new --home)")
    if manifest.database["kind"] == "sqlite" and sqlite_path(database_url).exists():
        raise BackupError(f"a database already exists at {sqlite_path(database_url)}; restore "
                          "needs an empty target")
    if manifest.database["kind"] == "postgresql" and not is_empty(database_url):
        raise BackupError("the target database (DATABASE_URL) already has tables; restore "
                          "needs an empty database")


def _verify_listed(manifest: Manifest, store: BlobStore) -> None:
    """A backup of an S3 store lists its objects: they must still be there, unchanged."""
    from ftune.service.blobs.s3 import S3BlobStore  # boto3 only when S3 is used

    if not isinstance(store, S3BlobStore):
        raise BackupError(f"the backup lists its blobs in {manifest.storage['location']} "
                          "without copying them; set FTUNE_STORAGE to that store")
    for entry in manifest.blobs:
        head = object_head(store, entry.key)
        if head is None:
            raise BackupError(f"the object {entry.key} is missing from {store.location}")
        if head[0] != entry.size or (entry.etag and head[1] != entry.etag):
            raise BackupError(f"the object {entry.key} in {store.location} has changed since "
                              "the backup (size or ETag)")


def _requeue_in_flight(db: Database) -> list[str]:
    """Jobs that were running or admitted at backup time: their workers and broker messages
    are gone with the old service, so they wait for the dispatcher again."""
    requeued = []
    with db.session() as session:
        running = session.execute(select(Job.id, Job.heartbeat_at)
                                  .where(Job.status == JobStatus.RUNNING)).all()
        for job_id, heartbeat_at in running:
            if transitions.requeue(session, job_id, REASON.format(status="running"),
                                   ran_until=heartbeat_at):
                requeued.append(job_id)
        admitted = session.scalars(select(Job.id).where(Job.status == JobStatus.ADMITTED))
        for job_id in list(admitted):
            # As the reconciler does with an admitted job no worker started.
            if rows_changed(session, update(Job).where(Job.id == job_id,
                                                       Job.status == JobStatus.ADMITTED)
                            .values(status=JobStatus.QUEUED, admitted_at=None)):
                status_event(session, job_id, JobStatus.QUEUED,
                             reason=REASON.format(status="admitted"))
                requeued.append(job_id)
    return requeued
