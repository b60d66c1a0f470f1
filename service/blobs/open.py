"""``FTUNE_STORAGE`` to a store: empty for the local folder under the data directory,
``file:///PATH`` for another folder, ``s3://bucket/prefix`` for an S3-compatible store."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from ftune.service.blobs.base import BlobStore
from ftune.service.blobs.local import LocalBlobStore

FORMS = "empty, file:///PATH or s3://BUCKET[/PREFIX]"


def check_storage_url(url: str | None) -> str | None:
    """``url`` when it names a store; ValueError naming the accepted forms otherwise."""
    if not url:
        return url
    parts = urlsplit(url)
    if (parts.scheme == "file" and parts.path.startswith("/") and not parts.netloc) or (
            parts.scheme == "s3" and parts.netloc):
        return url
    raise ValueError(f"FTUNE_STORAGE must be {FORMS}; got {url!r}")


def open_store(url: str | None, home: Path) -> BlobStore:
    url = check_storage_url(url)  # raises on a malformed one
    if not url:
        return LocalBlobStore(home / "blobs")
    parts = urlsplit(url)
    if parts.scheme == "file":
        return LocalBlobStore(Path(parts.path))
    from ftune.service.blobs.s3 import S3BlobStore  # boto3 only when S3 is used

    return S3BlobStore(parts.netloc, parts.path)
