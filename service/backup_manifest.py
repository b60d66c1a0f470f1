"""``manifest.json`` of a backup: what it holds, and the checks ``ftune restore`` makes before
it writes anything (a restore trusts nothing it reads from the backup)."""

from __future__ import annotations

import json
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftune.models.data.inspect import file_sha256
from ftune.service.blobs.base import check_key
from ftune.service.db.snapshot import POSTGRES_FILE, SQLITE_FILE

MANIFEST = "manifest.json"
FORMAT = "ftune-backup"
VERSION = 1
BLOBS = "blobs"  # the folder of copied blobs, each under its key
COPIED, LISTED = "copied", "listed"  # blobs copied into the backup, or only listed (S3)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BackupError(RuntimeError):
    """A backup could not be made, or one cannot be restored; the message names why."""


@dataclass(frozen=True)
class BlobEntry:
    key: str
    size: int
    sha256: str | None  # of a copied blob; of a listed one when its row records it
    etag: str | None = None  # a listed (S3) object's, to tell it was not replaced


@dataclass
class Manifest:
    created_at: str
    database: dict[str, Any]  # kind, file, sha256, size, schema_revision
    counts: dict[str, int]
    storage: dict[str, Any]  # mode (copied | listed), location
    blobs: list[BlobEntry] = field(default_factory=list)
    format: str = FORMAT
    version: int = VERSION

    def write(self, folder: Path) -> None:
        data = asdict(self)
        (folder / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_manifest(folder: Path) -> Manifest:
    """The backup's manifest, checked field by field; BackupError naming what is wrong."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BackupError(f"{folder} is not a backup folder (no such folder)")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackupError(f"{path} is missing: {folder} is not an ftune backup") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BackupError(f"{path} is corrupt (not JSON: {exc})") from None
    try:
        return _parsed(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise BackupError(f"{path} is corrupt: {exc}") from None


def _parsed(data: Any) -> Manifest:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"its format is not {FORMAT!r}")
    if data.get("version") != VERSION:
        raise ValueError(f"format version {data.get('version')!r}; this release reads "
                         f"version {VERSION}")
    database = _dict(data["database"], "database")
    kind, name = database["kind"], database["file"]
    if (kind, name) not in (("sqlite", SQLITE_FILE), ("postgresql", POSTGRES_FILE)):
        raise ValueError(f"unknown database {kind!r} in {name!r}")
    _sha(database["sha256"], "database.sha256")
    storage = _dict(data["storage"], "storage")
    if storage["mode"] not in (COPIED, LISTED):
        raise ValueError(f"unknown storage mode {storage['mode']!r}")
    blobs = [_blob(entry, storage["mode"] == COPIED) for entry in data["blobs"]]
    counts = {str(k): int(v) for k, v in _dict(data["counts"], "counts").items()}
    return Manifest(created_at=str(data["created_at"]), database=database, counts=counts,
                    storage=storage, blobs=blobs)


def _blob(entry: Any, copied: bool) -> BlobEntry:
    entry = _dict(entry, "a blob entry")
    key = check_key(str(entry["key"]))  # a path is built from it: only keys we make
    size = entry["size"]
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"blob {key}: size {size!r}")
    sha256 = entry.get("sha256")
    if copied or sha256 is not None:
        _sha(sha256, f"blob {key}: sha256")
    etag = entry.get("etag")
    return BlobEntry(key, size, sha256, None if etag is None else str(etag))


def _dict(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not an object")
    return value


def _sha(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ValueError(f"{what} is not a SHA-256")
    return value


def verify_file(path: Path, size: int, sha256: str, what: str, *, root: Path) -> None:
    """BackupError naming ``what`` unless the file is a regular file inside ``root`` (no link
    on the way: a crafted backup must not make a restore copy a file of the host) with that
    size and hash."""
    try:
        status = path.lstat()
    except FileNotFoundError:
        raise BackupError(f"{what} is missing from the backup ({path})") from None
    if not stat.S_ISREG(status.st_mode) or not path.resolve().is_relative_to(root.resolve()):
        raise BackupError(f"{what} is not a regular file inside the backup ({path}): links "
                          "and special files are refused")
    actual_size = status.st_size
    if actual_size != size or file_sha256(path) != sha256:
        raise BackupError(f"{what} fails its checksum ({path}): the backup is damaged or "
                          "was changed")
