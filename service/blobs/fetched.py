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

KIND = "fetched"
FILE = "object"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CorruptBlob(BlobError):
    """The object's bytes do not have the hash its row records."""


def fetch_verified(store: BlobStore, cache: DerivedStore, key: str, sha256: str, *,
                   owner: str | None = None) -> tuple[Path, bool]:
    """A local copy of the object ``key`` whose content hash is ``sha256``, and whether it
    was downloaded now (False: it was already on this host)."""
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"not a SHA-256: {sha256!r}")

    def download(folder: Path) -> None:
        digest = hashlib.sha256()
        with (folder / FILE).open("wb") as out:
            for chunk in store.read_chunks(key):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise CorruptBlob(f"{store.location}/{key}: its content hash is "
                              f"{digest.hexdigest()}, not the {sha256} recorded for it")

    folder, downloaded = cache.build(KIND, sha256, download, owner=owner)
    return folder / FILE, downloaded
