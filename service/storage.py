"""What one process keeps: the shared blob store (``blobs``: datasets, models, checkpoints,
logs and exports, which every host reaches over the network), this host's cache of what it
fetched from it (``derived``), and its own scratch folders under its data directory. Nothing
here is shared between hosts but ``blobs``. Every path and key is built from a server-made
id."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ftune.models.data.trees import remove_tree
from ftune.models.data.versions import overlay
from ftune.models.derived.store import DerivedStore
from ftune.models.export_formats import export_suffix
from ftune.service.blobs.base import BlobInfo, BlobMissing, BlobStore
from ftune.service.blobs.fetched import fetch_tree
from ftune.service.blobs.keys import dataset_key
from ftune.service.blobs.local import LocalBlobStore
from ftune.service.blobs.open import open_store
from ftune.service.blobs.tarred import tar_chunks
from ftune.service.ids import is_id

if TYPE_CHECKING:
    from ftune.service.settings import Settings

log = logging.getLogger(__name__)


def _checked(object_id: str) -> str:
    # Ids come from our own database, but a path must never be built from anything else.
    if not is_id(object_id):
        raise ValueError(f"not a valid id: {object_id!r}")
    return object_id


DEFAULT_CACHE_BYTES = 4 << 30
VERSION_KIND, VERSION_TREE = "version", "tree"  # a dataset version's tree, in the derived store

# What a process that owns a data directory creates is its user's alone: files 0600, folders
# 0700. The data directory holds the database, API keys' state, uploads and models.
PRIVATE_UMASK = 0o077
PRIVATE_DIR_MODE = 0o700


def keep_private(home: Path) -> None:
    """For the entry points that own ``home`` (``ftune up``, api, serve, worker, admin
    commands): everything this process creates from now on is private to its user, and so
    is ``home`` itself, made 0700 or tightened to it (files an older release left inside
    keep their modes, but no one else can reach them through it)."""
    os.umask(PRIVATE_UMASK)
    home.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    try:
        home.chmod(PRIVATE_DIR_MODE)
    except PermissionError as exc:  # a folder someone else owns: say so, but still serve
        log.warning("could not make the data directory %s private (mode 0700): %s", home, exc)


class Storage:
    def __init__(self, home: Path, blobs: BlobStore | None = None,
                 derived: DerivedStore | None = None) -> None:
        self.home = home
        self.blobs = blobs if blobs is not None else LocalBlobStore(home / "blobs")
        # What this host fetched from ``blobs`` (and decoded images, features), LRU-bounded.
        self.derived = (derived if derived is not None
                        else DerivedStore(home / "cache", DEFAULT_CACHE_BYTES))

    @classmethod
    def for_settings(cls, settings: Settings) -> Storage:
        """The process's storage: ``FTUNE_STORAGE``'s store, and its cache at
        ``FTUNE_CACHE_DIR`` (default: the data directory's cache/) bounded by
        ``FTUNE_CACHE_MB``."""
        home = settings.resolved_home
        return cls(home, open_store(settings.storage, home),
                   DerivedStore(settings.engine.cache_dir or home / "cache",
                                settings.engine.cache_bytes))

    def put_tree(self, key: str, folder: Path) -> BlobInfo:
        """Store the folder as one tar object, streamed (see ``blobs.tarred``)."""
        return self.blobs.put_chunks(key, tar_chunks(folder))

    def local_tree(self, key: str, sha256: str, owner: str | None = None) -> Path:
        """The folder stored under ``key`` (a tar whose hash is ``sha256``), on this host:
        fetched and verified once, then shared by every job here until evicted."""
        started = time.monotonic()
        folder, downloaded = fetch_tree(self.blobs, self.derived, key, sha256, owner=owner)
        if downloaded:
            log.info("fetched %s from the store in %.1f s", key, time.monotonic() - started)
        return folder

    def local_dataset(self, parts: list[tuple[str, str | None]],
                      owner: str | None = None) -> Path:
        """A dataset's images on this host: ``parts`` is its chain of versions, oldest first
        (id, tar SHA-256; an upload is a chain of one; BlobMissing naming a part without
        one). A version's tree is its parents'
        trees with what it added over them (``models.data.versions.overlay``, hard links),
        kept in the derived store (kind ``version``) like the trees themselves."""
        trees = []
        for dataset_id, sha256 in parts:
            if sha256 is None:  # its row says its images were never stored, or are gone
                raise BlobMissing(dataset_key(dataset_id))
            trees.append(self.local_tree(dataset_key(dataset_id), sha256, owner=owner))
        if len(trees) == 1:
            return trees[0]
        key = hashlib.sha256(":".join(str(sha256) for _, sha256 in parts).encode()).hexdigest()
        folder, _ = self.derived.build(VERSION_KIND, key,
                                       lambda tmp: overlay(trees, tmp / VERSION_TREE), owner)
        return folder / VERSION_TREE

    @property
    def datasets(self) -> Path:
        """Where uploads are unpacked and checked, before they go to the store."""
        return self.home / "datasets"

    @property
    def jobs(self) -> Path:
        return self.home / "jobs"

    @property
    def uploads(self) -> Path:
        return self.home / "uploads"

    @property
    def exports(self) -> Path:
        return self.home / "exports"

    @property
    def tmp(self) -> Path:
        return self.home / "tmp"

    def prepare(self) -> None:
        self.home.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        for folder in (self.datasets, self.jobs, self.uploads, self.exports, self.tmp):
            folder.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)

    def sweep_stale(self, max_age_s: float = 24 * 3600) -> int:
        """Remove what a crashed process left: upload parts and unpacking folders; how many.

        Only old ones: another API process sharing this directory may be mid-upload. Never
        raises (the API calls it at start-up): what cannot be removed is logged and left.
        """
        cutoff = time.time() - max_age_s
        removed = 0
        for folder, pattern in ((self.uploads, "*.part"), (self.datasets, ".*.staging"),
                                (self.tmp, "deleted-*")):
            try:
                stale = [p for p in folder.glob(pattern) if _older_than(p, cutoff)]
            except OSError as exc:
                log.warning("cannot look for leftovers in %s: %s", folder, exc)
                continue
            removed += sum(_remove_leftover(path) for path in stale)
        return removed

    def job_dir(self, job_id: str) -> Path:
        """This host's files of a job it runs: checkpoints and log lines, shipped to the
        store as they are written (``blobs.keys``)."""
        return self.jobs / _checked(job_id)

    def export_file(self, model_id: str, fmt: str) -> Path:
        """Where this host builds the model's download in ``fmt`` before storing it."""
        return self.exports / f"{_checked(model_id)}{export_suffix(fmt)}"

    def remove_job_files(self, job_id: str) -> None:
        """This host's files of the job (the store's go with ``blobs.deletions``)."""
        remove_tree(self.job_dir(job_id))


def _remove_leftover(path: Path) -> bool:
    try:
        return remove_tree(path)  # logs what it cannot remove
    except Exception:  # start-up must go on whatever a leftover holds
        log.exception("could not remove the leftover %s", path)
        return False


def _older_than(path: Path, cutoff: float) -> bool:
    try:
        return path.lstat().st_mtime < cutoff
    except OSError:  # gone meanwhile (another process swept it)
        return False
