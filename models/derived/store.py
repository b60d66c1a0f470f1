"""One on-disk store for everything derived from a dataset: decoded images now, frozen
features and adapted backbones later. Entries are keyed by what they derive from (the
dataset's content hash and the parameters), so a changed dataset never meets a stale entry.

Each entry is a folder ``ROOT/<kind>/<key>/`` with ``meta.json`` (owner, bytes, created). It
is built in a temporary folder and renamed into place, under a per-key lock, so concurrent
jobs build it once and never read half an entry. ``meta.json``'s modification time is the
entry's last use; the least recently used entries go when the store exceeds its size cap.
Bytes are accounted to the owner (the tenant) that built the entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
META = "meta.json"
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


@dataclass(frozen=True)
class Entry:
    kind: str
    key: str
    owner: str | None
    bytes: int
    last_used: float
    path: Path


# Entries used in the last minute are not evicted: a lookup returns the folder before its
# files are opened, and another process's eviction must not take it away in between (the
# store may stay over its cap that long).
MIN_IDLE_S = 60.0


def _check_name(name: str) -> str:
    if not name or name.startswith(".") or not set(name) <= _SAFE:
        raise ValueError(f"bad derived-store name {name!r}")
    return name


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class DerivedStore:
    def __init__(self, root: Path, max_bytes: int, *, min_idle_s: float = MIN_IDLE_S) -> None:
        self.root, self.max_bytes = Path(root), max_bytes
        # An entry looked up this recently is being opened by someone: eviction leaves it.
        self.min_idle_s = min_idle_s

    def _path(self, kind: str, key: str) -> Path:
        return self.root / _check_name(kind) / _check_name(key)

    def lookup(self, kind: str, key: str) -> Path | None:
        """The entry's folder when it is complete (its use is recorded), else None."""
        folder = self._path(kind, key)
        try:
            os.utime(folder / META)
        except FileNotFoundError:
            return None
        return folder

    @contextlib.contextmanager
    def _locked(self, kind: str, key: str) -> Iterator[None]:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{_check_name(kind)}-{_check_name(key)}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def build(self, kind: str, key: str, make: Callable[[Path], None],
              owner: str | None = None) -> tuple[Path, bool]:
        """The entry, made by ``make(folder)`` unless it exists; True when it was made now."""
        if (found := self.lookup(kind, key)) is not None:
            return found, False
        with self._locked(kind, key):
            if (found := self.lookup(kind, key)) is not None:  # built while we waited
                return found, False
            tmp = self.root / ".tmp" / uuid.uuid4().hex
            tmp.mkdir(parents=True)
            try:
                make(tmp)
                meta = {"kind": kind, "key": key, "owner": owner, "bytes": _folder_bytes(tmp),
                        "created_at": time.time()}
                (tmp / META).write_text(json.dumps(meta))
                final = self._path(kind, key)
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp.rename(final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self.evict(keep=final)
        return final, True

    def build_and_open(self, kind: str, key: str, make: Callable[[Path], None],
                       open_entry: Callable[[Path], T], owner: str | None = None
                       ) -> tuple[T, bool]:
        """``open_entry`` of the entry (made by ``make`` unless it exists), and whether it
        was made now. Built again once if it vanished between the lookup and the opening
        (``ftune cache clean``, or eviction by another process)."""
        for attempt in range(2):
            folder, made = self.build(kind, key, make, owner)
            try:
                return open_entry(folder), made
            except FileNotFoundError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def entries(self) -> list[Entry]:
        found = []
        for meta_path in self.root.glob(f"*/*/{META}"):
            if meta_path.parent.parent.name.startswith("."):
                continue  # a build not yet renamed into place, or an entry being removed
            try:
                meta = json.loads(meta_path.read_text())
                used = meta_path.stat().st_mtime
            except (OSError, ValueError):
                continue  # removed meanwhile, or damaged: clean() takes it
            found.append(Entry(meta["kind"], meta["key"], meta.get("owner"),
                               int(meta.get("bytes", 0)), used, meta_path.parent))
        return sorted(found, key=lambda e: e.last_used)

    def usage_by_owner(self) -> dict[str | None, int]:
        usage: dict[str | None, int] = {}
        for entry in self.entries():
            usage[entry.owner] = usage.get(entry.owner, 0) + entry.bytes
        return usage

    def evict(self, keep: Path | None = None) -> int:
        """Remove least recently used entries until the store fits its cap; bytes freed."""
        entries = self.entries()
        total = sum(e.bytes for e in entries)
        freed = 0
        recent = time.time() - self.min_idle_s
        for entry in entries:
            if total - freed <= self.max_bytes:
                break
            if entry.path != keep and entry.last_used < recent:
                freed += self._remove(entry)
        return freed

    def clean(self, owner: str | None = None, kind: str | None = None) -> tuple[int, int]:
        """Remove every entry (or an owner's, or a kind's); returns (entries, bytes)."""
        removed = [e for e in self.entries() if (owner is None or e.owner == owner)
                   and (kind is None or e.kind == kind)]
        freed = sum(self._remove(e) for e in removed)
        if owner is None and kind is None:
            shutil.rmtree(self.root / ".tmp", ignore_errors=True)  # left by crashed builds
        return len(removed), freed

    def _remove(self, entry: Entry) -> int:
        # The folder is renamed away first, so a reader never sees it half deleted; a process
        # with the files open (memory-mapped) keeps reading them until it closes them.
        doomed = self.root / ".tmp" / f"gone-{uuid.uuid4().hex}"
        doomed.parent.mkdir(parents=True, exist_ok=True)
        try:
            entry.path.rename(doomed)
        except OSError:
            return 0
        shutil.rmtree(doomed, ignore_errors=True)
        return entry.bytes
