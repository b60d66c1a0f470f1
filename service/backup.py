"""``ftune backup DEST``: a consistent backup of a running service, as one folder.

First the database, as one moment (``db/snapshot.py``); then the blobs its rows refer to,
read after it, so every row's blob is there (a blob is stored before the row that names it
commits, and deleted only after its row is). Blobs written after that moment are not in the
backup, as their rows are not. A local store's blobs are copied, each with its SHA-256; an
S3 store's are listed (key, size, ETag), checked to exist, and left where they are.

The folder is written under a temporary name beside DEST and renamed when complete, so a
backup that failed halfway is never mistaken for one.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path

from ftune.service.backup_manifest import (
    BLOBS,
    COPIED,
    LISTED,
    BackupError,
    BlobEntry,
    Manifest,
    file_sha256,
)
from ftune.service.blobs.base import BlobMissing, BlobStore
from ftune.service.blobs.keys import dataset_key, model_key, prefixes_of
from ftune.service.blobs.local import LocalBlobStore
from ftune.service.db.snapshot import Contents, SnapshotError, copy_database, database_kind


def take_backup(database_url: str, store: BlobStore, dest: Path) -> Manifest:
    """Write the backup of the database at ``database_url`` and its blobs in ``store`` to
    ``dest`` (which must not exist, or be an empty folder)."""
    dest = dest.expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} already exists and is not an empty folder; choose a new "
                          "destination")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial-{uuid.uuid4().hex[:8]}")
    partial.mkdir(mode=0o700)  # it holds every tenant's data and the keys' hashes
    try:
        manifest = _write(database_url, store, partial)
        if dest.exists():
            dest.rmdir()
        partial.replace(dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return manifest


def _write(database_url: str, store: BlobStore, folder: Path) -> Manifest:
    kind = database_kind(database_url)
    try:
        dump, contents = copy_database(database_url, folder)
    except SnapshotError as exc:
        raise BackupError(str(exc)) from None
    if isinstance(store, LocalBlobStore):
        mode, blobs = COPIED, _copy_blobs(store, contents, folder / BLOBS)
    else:
        mode, blobs = LISTED, _list_blobs(store, contents)
    manifest = Manifest(
        created_at=datetime.now(UTC).isoformat(),
        database={"kind": kind, "file": dump.name, "sha256": file_sha256(dump),
                  "size": dump.stat().st_size, "schema_revision": contents.revision},
        counts=contents.counts, storage={"mode": mode, "location": store.location},
        blobs=blobs)
    manifest.write(folder)
    return manifest


def _recorded(contents: Contents) -> dict[str, str | None]:
    """The blobs a row records the hash of: each dataset's images, each model's bundle.
    These must exist; the rest (checkpoints, logs, exports) are kept when present."""
    return ({dataset_key(d): sha for d, sha in contents.datasets.items()}
            | {model_key(m): sha for m, sha in contents.models.items()})


def _keys(store: BlobStore, contents: Contents) -> list[str]:
    prefixes = prefixes_of(datasets=contents.datasets, models=contents.models,
                           jobs=contents.jobs)
    return sorted({key for prefix in prefixes for key in store.keys(prefix)})


def _copy_blobs(store: BlobStore, contents: Contents, folder: Path) -> list[BlobEntry]:
    recorded = _recorded(contents)
    entries = []
    for key in _keys(store, contents):
        try:
            entry = _copy_one(store, key, folder / key)
        except BlobMissing:
            if key in recorded:
                raise _deleted_meanwhile(key) from None
            continue  # a checkpoint or export replaced or deleted meanwhile: not needed
        expected = recorded.get(key)
        if expected is not None and entry.sha256 != expected:
            raise BackupError(f"the stored object {key} does not match the SHA-256 on its "
                              "row: the store is damaged; nothing was backed up")
        entries.append(entry)
    missing = sorted(set(recorded) - {e.key for e in entries})
    if missing:
        raise _deleted_meanwhile(missing[0])
    return entries


def _copy_one(store: BlobStore, key: str, path: Path) -> BlobEntry:
    path.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with path.open("wb") as out:
        for chunk in store.read_chunks(key):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    return BlobEntry(key, size, digest.hexdigest())


def _list_blobs(store: BlobStore, contents: Contents) -> list[BlobEntry]:
    """An S3 store's objects, described and checked to exist, not copied."""
    recorded = _recorded(contents)
    entries = []
    for key in sorted(set(_keys(store, contents)) | set(recorded)):
        head = object_head(store, key)
        if head is None:
            if key in recorded:
                raise _deleted_meanwhile(key)
            continue
        entries.append(BlobEntry(key, head[0], recorded.get(key), head[1]))
    return entries


def object_head(store: BlobStore, key: str) -> tuple[int, str] | None:
    """An S3 object's size and ETag; None when there is no such object."""
    from botocore.exceptions import ClientError

    from ftune.service.blobs.s3 import S3BlobStore, _missing

    assert isinstance(store, S3BlobStore), "only an S3 store's objects are listed"
    try:
        head = store.client.head_object(Bucket=store.bucket, Key=store._name(key))
    except ClientError as exc:
        if _missing(exc):
            return None
        raise
    return int(head["ContentLength"]), str(head["ETag"]).strip('"')


def _deleted_meanwhile(key: str) -> BackupError:
    return BackupError(f"the object {key} that the database refers to is gone from the "
                       "store (deleted while the backup ran, or lost); run the backup again")
