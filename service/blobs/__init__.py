"""Where blobs live: one interface (``BlobStore``), two backends (a local folder, any
S3-compatible store), chosen by ``FTUNE_STORAGE`` (``open_store``)."""

from ftune.service.blobs.base import BlobError, BlobInfo, BlobStore, check_key
from ftune.service.blobs.open import open_store

__all__ = ["BlobError", "BlobInfo", "BlobStore", "check_key", "open_store"]
