"""What each tenant owns, as its own requests saw it: the ids the checker holds every answer
and every database row against (no tenant may ever see another's object)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

KINDS = ("datasets", "jobs", "models", "sweeps")


@dataclass
class TenantState:
    name: str
    tenant_id: str
    key: str  # an admin key of the tenant
    owned: dict[str, set[str]] = field(default_factory=lambda: {k: set() for k in KINDS})
    deleted: dict[str, set[str]] = field(default_factory=lambda: {k: set() for k in KINDS})
    # Deletes whose outcome is unknown: no answer, or a 5xx (the database dropped the
    # connection around the commit, which may have gone through). Such an object may be
    # there or gone; a later 404 for it settles it as deleted.
    perhaps_deleted: dict[str, set[str]] = field(
        default_factory=lambda: {k: set() for k in KINDS})
    accepted_jobs: set[str] = field(default_factory=set)  # every 202 (and sweep trials)
    finished_jobs: set[str] = field(default_factory=set)
    to_cancel: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, object_id: str) -> None:
        with self.lock:
            self.owned[kind].add(object_id)
            if kind == "jobs":
                self.accepted_jobs.add(object_id)

    def remove(self, kind: str, object_id: str) -> None:
        with self.lock:
            self.deleted[kind].add(object_id)

    def perhaps_removed(self, kind: str, object_id: str) -> None:
        with self.lock:
            self.perhaps_deleted[kind].add(object_id)

    def may_be_gone(self, kind: str, object_id: str) -> bool:
        with self.lock:
            return object_id in self.deleted[kind] or object_id in self.perhaps_deleted[kind]

    def live(self, kind: str) -> list[str]:
        """Owned and not deleted, in a stable order (the workload draws from it)."""
        with self.lock:
            return sorted(self.owned[kind] - self.deleted[kind])

    def active_jobs(self) -> list[str]:
        with self.lock:
            return sorted(self.accepted_jobs - self.finished_jobs - self.deleted["jobs"])


@dataclass
class Tenants:
    states: list[TenantState]

    def owner_of(self, object_id: str) -> TenantState | None:
        for state in self.states:
            with state.lock:
                if any(object_id in ids for ids in state.owned.values()):
                    return state
        return None

    def others(self, state: TenantState) -> list[TenantState]:
        return [s for s in self.states if s is not state]

    def by_id(self) -> dict[str, TenantState]:
        return {s.tenant_id: s for s in self.states}
