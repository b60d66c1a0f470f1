"""What a host fetched from the blob store, kept on its own disk: one entry of the derived
store (kind ``fetched``) per object, keyed by the object's SHA-256. The entry is verified as
it is written and only then made visible, so a corrupt or partial download is never used;
the derived store's size cap (``FTUNE_CACHE_MB`` on workers) and LRU eviction bound it, and
every job on the host shares it: a second job on the same data downloads nothing."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ftune.models.derived.store import DerivedStore
from ftune.service.blobs.base import BlobError, BlobStore
from ftune.service.blobs.tarred import untar

KIND = "fetched"
TREE_KIND = "unpacked"
TREE = "tree"
FILE = "object"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CorruptBlob(BlobError):
    """The object's bytes do not have the hash its row records."""


def fetch_verified(store: BlobStore, cache: DerivedStore, key: str, sha256: str, *,
                   owner: str | None = None) -> tuple[Path, bool]:
    """A local copy of the object ``key`` whose content hash is ``sha256``, and whether it
    was downloaded now (False: it was already on this host)."""
    _check_sha(sha256)
    folder, downloaded = cache.build(
        KIND, sha256, lambda folder: _download(store, key, sha256, folder / FILE), owner=owner)
    return folder / FILE, downloaded


def fetch_tree(store: BlobStore, cache: DerivedStore, key: str, sha256: str, *,
               owner: str | None = None) -> tuple[Path, bool]:
    """The folder a tar object (``tarred.tar_chunks``) holds, unpacked on this host and kept
    as one derived-store entry (kind ``unpacked``, keyed by the tar's SHA-256; the tar itself
    is not kept), and whether it was downloaded now."""
    _check_sha(sha256)

    def make(folder: Path) -> None:
        archive = folder.parent / f"{folder.name}.tar"
        try:
            _download(store, key, sha256, archive)
            (folder / TREE).mkdir()
            untar(archive, folder / TREE)
        finally:
            archive.unlink(missing_ok=True)

    # The files go in a subfolder: the entry's own meta.json must not look like one of them.
    folder, downloaded = cache.build(TREE_KIND, sha256, make, owner=owner)
    return folder / TREE, downloaded


def _check_sha(sha256: str) -> None:
    if not _SHA256.fullmatch(sha256 or ""):
        raise ValueError(f"not a SHA-256: {sha256!r}")


def _download(store: BlobStore, key: str, sha256: str, path: Path) -> None:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for chunk in store.read_chunks(key):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha256:
        raise CorruptBlob(f"{store.location}/{key}: its content hash is "
                          f"{digest.hexdigest()}, not the {sha256} recorded for it")
