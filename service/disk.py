"""Free space under the data directory, kept above a reserve.

Datasets, models, uploads and (with SQLite) the database share one disk. Anything that would
write a lot is bounded by what the disk holds above ``FTUNE_MIN_FREE_DISK_MB``, and refused
with 507 when there is nothing left above it: a full disk would fail every write, database
commits included, and that would be an outage rather than one refused upload.
"""

from __future__ import annotations

import shutil

from ftune.service.errors import InsufficientStorage
from ftune.service.settings import Settings
from ftune.service.storage import Storage

RETRY_AFTER_S = 300  # someone must free space first


def disk_allowance(storage: Storage, settings: Settings, what: str) -> int:
    """Bytes that may be written before the disk is down to its reserve; 507 if none."""
    free = shutil.disk_usage(storage.home).free
    reserve = int(settings.min_free_disk_mb * 2**20)
    if free <= reserve:
        raise disk_full(what, free, reserve)
    return free - reserve


def disk_full(what: str, free: int, reserve: int) -> InsufficientStorage:
    return InsufficientStorage(
        f"{what} refused: the server's data disk has {free // 2**20} MB free and keeps "
        f"{reserve // 2**20} MB in reserve (FTUNE_MIN_FREE_DISK_MB); ask an operator to free "
        "space", retry_after_s=RETRY_AFTER_S)


def over_disk_allowance(what: str, allowance: int) -> InsufficientStorage:
    return InsufficientStorage(
        f"{what} refused: it needs more than the {allowance // 2**20} MB the server's data "
        "disk has above its reserve (FTUNE_MIN_FREE_DISK_MB); ask an operator to free space",
        retry_after_s=RETRY_AFTER_S)
