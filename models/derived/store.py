"""One on-disk store for everything derived from a dataset: decoded images now, frozen
features and adapted backbones later. Entries are keyed by what they derive from (the
dataset's content hash and the parameters), so a changed dataset never meets a stale entry.

Each entry is a folder ``ROOT/<kind>/<key>.<owner tag>/`` with ``meta.json`` (key, owner,
bytes, created). It is built in a temporary folder and renamed into place, under a per-entry
lock, so concurrent jobs build it once and never read half an entry. ``meta.json``'s
modification time is the entry's last use.

Entries are private to their owner (the tenant whose job made them): the folder name carries
a hash of the owner, so a job finds only its own tenant's entries. A store shared across
owners would tell a tenant, through a "reused" choice, a log line or a fast run, that another
tenant had the same images; ``FTUNE_SHARE_DERIVED_ACROSS_TENANTS`` lets an operator accept
that disclosure for one copy per content (keys then carry no tag). Entries made without an
owner (``ftune train``, library use) carry no tag either.

When the store exceeds its size cap, the least recently used entries go, those of owners
holding more than an equal share of the cap first: a tenant filling the store evicts its own
entries before another's.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ftune.models.settings import engine_settings

T = TypeVar("T")
META = "meta.json"
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
OWNER_SEP = "."  # between a key and its owner's tag in a folder name; never in a key


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


def owner_tag(owner: str) -> str:
    """What an owner's entries' folder names end with: a hash, so any owner id makes a safe
    name and a listing of the folder does not name tenants."""
    return "o" + hashlib.sha256(owner.encode()).hexdigest()[:16]


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class DerivedStore:
    def __init__(self, root: Path, max_bytes: int, *, min_idle_s: float = MIN_IDLE_S,
                 shared: bool | None = None) -> None:
        self.root, self.max_bytes = Path(root), max_bytes
        # An entry looked up this recently is being opened by someone: eviction leaves it.
        self.min_idle_s = min_idle_s
        # One copy per content for every owner (an operator's choice: it discloses, see
        # above); by default the settings' FTUNE_SHARE_DERIVED_ACROSS_TENANTS, off.
        self.shared = engine_settings().share_derived_across_tenants if shared is None \
            else shared

    def _name(self, key: str, owner: str | None) -> str:
        """The entry's folder name: the key, and its owner's tag unless entries are shared."""
        if OWNER_SEP in _check_name(key):
            raise ValueError(f"bad derived-store key {key!r}: {OWNER_SEP!r} is reserved")
        return key if owner is None or self.shared else f"{key}{OWNER_SEP}{owner_tag(owner)}"

    def _path(self, kind: str, name: str) -> Path:
        return self.root / _check_name(kind) / name

    def lookup(self, kind: str, key: str, owner: str | None = None) -> Path | None:
        """The entry's folder when it is complete (its use is recorded), else None: the
        owner's own entry (any owner's when the store is shared)."""
        return self._lookup(kind, self._name(key, owner))

    def _lookup(self, kind: str, name: str) -> Path | None:
        folder = self._path(kind, name)
        try:
            os.utime(folder / META)
        except FileNotFoundError:
            return None
        return folder

    @contextlib.contextmanager
    def _locked(self, kind: str, name: str) -> Iterator[None]:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{_check_name(kind)}-{name}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def build(self, kind: str, key: str, make: Callable[[Path], None],
              owner: str | None = None) -> tuple[Path, bool]:
        """The owner's entry (any owner's when shared), made by ``make(folder)`` unless it
        exists; True when it was made now."""
        name = self._name(key, owner)
        if (found := self._lookup(kind, name)) is not None:
            return found, False
        with self._locked(kind, name):
            if (found := self._lookup(kind, name)) is not None:  # built while we waited
                return found, False
            tmp = self.root / ".tmp" / uuid.uuid4().hex
            tmp.mkdir(parents=True)
            try:
                make(tmp)
                meta = {"kind": kind, "key": key, "owner": owner, "bytes": _folder_bytes(tmp),
                        "created_at": time.time()}
                (tmp / META).write_text(json.dumps(meta))
                final = self._path(kind, name)
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
        """Remove least recently used entries until the store fits its cap, those of owners
        over an equal share of the cap first; bytes freed."""
        recent = time.time() - self.min_idle_s
        entries = self.entries()
        usage: dict[str | None, int] = {}
        for entry in entries:
            usage[entry.owner] = usage.get(entry.owner, 0) + entry.bytes
        share = self.max_bytes / max(1, len(usage))
        candidates = [e for e in entries if e.path != keep and e.last_used < recent]
        total, freed = sum(usage.values()), 0
        while total - freed > self.max_bytes and candidates:
            # The oldest entry of an owner still over its share, else the oldest of all.
            victim = next((e for e in candidates if usage[e.owner] > share), candidates[0])
            candidates.remove(victim)
            freed += self._remove(victim)
            usage[victim.owner] -= victim.bytes
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
