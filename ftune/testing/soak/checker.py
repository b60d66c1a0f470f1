"""What must stay true, checked from a read-only database connection, the blob store's files and
the API, during the soak and at its end:

- no job lost: every accepted job has its row, and at the end is finished or legitimately
  waiting (held, or retrying later) or still running with a fresh heartbeat;
- no epoch recorded twice (each epoch's event at most once per attempt of its job);
- at most one model per job;
- no row pointing at a missing object, and no object without its row (once nothing under
  its prefix has changed for ``grace_s``: deletions are retried, and writers store an object
  before they record its row or check that its job still exists; a writer's hold on what it
  stores counts from when it comes due);
- usage (GET /v1/usage) equal to what the rows hold, and model sizes to the objects';
- every row in the tenant the workload saw it in.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
from sqlalchemy import Connection, Engine, create_engine, func, select

from ftune.service.db.session import normalize_url
from ftune.service.db.tables import BlobDeletion, Dataset, Job, JobEvent, TunedModel
from ftune.service.events import EventKind
from ftune.testing.soak.journal import Journal
from ftune.testing.soak.tenants import Tenants

TERMINAL = ("succeeded", "failed", "cancelled", "pruned")
# Object prefixes in the store, and the id column of the row each belongs to.
PREFIX_ROWS = {"datasets": Dataset.id, "models": TunedModel.id, "exports": TunedModel.id,
               "jobs": Job.id}


def read_only_engine(database_url: str) -> Engine:
    """A connection that cannot write: the checker only looks."""
    url = normalize_url(database_url)
    if url.startswith("sqlite:///"):
        return create_engine(f"sqlite:///file:{url[len('sqlite:///'):]}?mode=ro&uri=true",
                             connect_args={"timeout": 30})
    return create_engine(url, pool_pre_ping=True,
                         connect_args={"options": "-c default_transaction_read_only=on"})


def _stored(path: Path) -> bool:
    """A whole object (the local store writes ``.NAME.partial`` first, then renames)."""
    return path.is_file() and not path.name.startswith(".")


def _newest_change(folder: Path) -> float:
    """When anything under ``folder`` last changed. A writer stores its object first and
    then records its row, or checks that its job still exists and removes what it wrote:
    for that moment an object has no row, and such a file deep in the prefix (a job's log
    rewritten after its row was deleted) leaves the prefix's own folder time as it was."""
    newest = 0.0
    for path in (folder, *folder.rglob("*")):
        with contextlib.suppress(FileNotFoundError):  # removed while we walk
            newest = max(newest, path.stat().st_mtime)
    return newest


def _now() -> datetime:
    return datetime.now(UTC)


def _pending(db: Connection, prefix: str | None = None) -> dict[str, datetime]:
    """Scheduled deletions (of ``prefix`` alone, if given) and when each is due: a writer's
    hold counts from when it comes due (a writer killed between storing and recording
    leaves one: the upkeep removes its objects then)."""
    query = select(BlobDeletion.prefix, BlobDeletion.created_at, BlobDeletion.not_before)
    if prefix is not None:
        query = query.where(BlobDeletion.prefix == prefix)
    return {p: cast(datetime, _aware(due or created)) for p, created, due in db.execute(query)}


def _aware(value: datetime | None) -> datetime | None:
    """A time read from the database, in UTC (SQLite gives it back without a zone)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


@dataclass
class Checker:
    database_url: str
    blobs: Path  # the local store's folder (FTUNE_HOME/blobs)
    journal: Journal
    tenants: Tenants
    # A deleted object goes right after its rows' commit, or at the upkeep's next retry
    # (FTUNE_RECONCILE_INTERVAL_S, 2 s here): a few rounds of that.
    grace_s: float = 12.0
    stale_s: float = 30.0  # a running job's heartbeat older than this at the end: stuck

    def __post_init__(self) -> None:
        self.engine = read_only_engine(self.database_url)

    def check(self, *, final: bool = False, api_url: str | None = None) -> None:
        """Every invariant once; violations go to the journal (each lasting one once)."""
        self.jobs_not_lost(final=final)
        self.epochs_once()
        self.one_model_per_job()
        self.rows_have_objects()
        self.objects_have_rows(final=final)
        if final and api_url is not None:
            self.usage_matches(api_url)

    def close(self) -> None:
        self.engine.dispose()

    # -- jobs ------------------------------------------------------------------------------
    def jobs_not_lost(self, *, final: bool) -> None:
        expected = {job_id: state for state in self.tenants.states
                    for job_id in state.accepted_jobs - state.deleted["jobs"]}
        with self.engine.connect() as db:
            rows = {r.id: r for r in db.execute(select(
                Job.id, Job.tenant_id, Job.status, Job.hold_reason, Job.retry_at,
                Job.heartbeat_at).where(Job.id.in_(list(expected))))} if expected else {}
        for job_id, state in expected.items():
            row = rows.get(job_id)
            if row is None:
                if not state.may_be_gone("jobs", job_id):  # not deleted meanwhile
                    self.journal.violate("no job lost", f"{state.name}'s job {job_id} was "
                                         "accepted and has no row", key=job_id)
                continue
            if row.tenant_id != state.tenant_id:
                self.journal.violate("no tenant sees another's object", f"job {job_id} seen "
                                     f"by {state.name} belongs to {row.tenant_id}", key=job_id)
            if final and row.status not in TERMINAL and not self._legitimately_waiting(row):
                self.journal.violate("no job lost", f"{state.name}'s job {job_id} ended the "
                                     f"soak {row.status} (hold: {row.hold_reason}, heartbeat "
                                     f"{row.heartbeat_at}) with nothing to wait for",
                                     key=f"final:{job_id}")

    def _legitimately_waiting(self, row: object) -> bool:
        now = _now()
        status, hold = getattr(row, "status"), getattr(row, "hold_reason")  # noqa: B009
        retry_at, heartbeat = (_aware(getattr(row, "retry_at")),  # noqa: B009
                               _aware(getattr(row, "heartbeat_at")))  # noqa: B009
        if status in ("queued", "admitted"):
            return bool(hold) or (retry_at is not None and retry_at > now)
        return heartbeat is not None and now - heartbeat < timedelta(seconds=self.stale_s)

    def epochs_once(self) -> None:
        """An epoch's event may repeat only when an attempt died after reporting it (the next
        resumes from the last checkpoint): never more often than the job had attempts."""
        with self.engine.connect() as db:
            events = db.execute(select(JobEvent.job_id, JobEvent.data).where(
                JobEvent.kind == EventKind.EPOCH)).all()
            attempts = dict(db.execute(select(Job.id, Job.attempts)).all())
        counts = Counter((job_id, (data or {}).get("epoch")) for job_id, data in events)
        for (job_id, epoch), seen in counts.items():
            if job_id in attempts and seen > max(1, attempts[job_id]):
                self.journal.violate("no epoch recorded twice",
                                     f"job {job_id}'s epoch {epoch} recorded {seen} times in "
                                     f"{attempts[job_id]} attempt(s)", key=f"{job_id}:{epoch}")

    def one_model_per_job(self) -> None:
        with self.engine.connect() as db:
            doubled = db.execute(select(TunedModel.job_id, func.count()).group_by(
                TunedModel.job_id).having(func.count() > 1)).all()
        for job_id, count in doubled:
            self.journal.violate("at most one model per job", f"job {job_id} has {count} "
                                 "models", key=job_id)

    # -- objects and rows ------------------------------------------------------------------
    def _keys(self, prefix: str, most: int = 10) -> str:
        """What an orphan holds, with times: which writer left it (an export, a log, a
        bundle) is the first thing to know."""
        folder = self.blobs / prefix
        found = []
        for path in sorted(folder.rglob("*")):
            with contextlib.suppress(FileNotFoundError):
                if _stored(path):
                    when = datetime.fromtimestamp(path.stat().st_mtime, UTC)
                    found.append(f"{path.relative_to(folder)} ({when:%H:%M:%S.%f})")
        return ", ".join(found[:most]) + (" …" if len(found) > most else "") or "nothing"

    def _has_files(self, prefix: str) -> bool:
        folder = self.blobs / prefix
        return folder.is_dir() and any(_stored(p) for p in folder.rglob("*"))

    def rows_have_objects(self) -> None:
        settled = _now() - timedelta(seconds=self.grace_s)
        with self.engine.connect() as db:
            datasets = db.execute(select(Dataset.id).where(
                Dataset.blob_sha256.is_not(None), Dataset.created_at < settled)).scalars().all()
            models = db.execute(select(TunedModel.id).where(
                TunedModel.blob_sha256.is_not(None), TunedModel.created_at < settled)
            ).scalars().all()
        for table, kind, ids, name in ((Dataset, "datasets", datasets, "images.tar"),
                                       (TunedModel, "models", models, "bundle.tar")):
            for object_id in ids:
                if (self.blobs / kind / object_id / name).is_file():
                    continue
                with self.engine.connect() as db:  # deleted meanwhile is no violation
                    still = db.scalar(select(table.id).where(table.id == object_id))
                if still is not None:
                    self.journal.violate("no row points at a missing object",
                                         f"{kind[:-1]} {object_id}'s row has no {kind}/"
                                         f"{object_id}/{name} in the store", key=object_id)

    def objects_have_rows(self, *, final: bool) -> None:
        """Each object's prefix has its row, once the grace a delete needs has passed."""
        horizon = _now().timestamp() - self.grace_s
        with self.engine.connect() as db:
            pending = _pending(db)
        for kind, column in PREFIX_ROWS.items():
            folder = self.blobs / kind
            for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
                prefix = f"{kind}/{entry.name}/"
                scheduled = pending.get(prefix)
                if (not self._has_files(prefix) or _newest_change(entry) > horizon
                        or (scheduled and scheduled.timestamp() > horizon)):
                    continue
                self.orphan_unless_deleted(prefix, column, horizon)

    def orphan_unless_deleted(self, prefix: str, column: Any, horizon: float) -> None:
        """Judge ``prefix`` from fresh reads, in the order a delete writes them: its row,
        then its scheduled deletion (one transaction removes the row and schedules the
        deletion), then its files (removed before the schedule goes). A delete committed
        since the first look at the pending deletions is no orphan: the soak found that
        first look stale four times in an hour."""
        with self.engine.connect() as db:
            if db.scalar(select(column).where(column == prefix.split("/")[1])) is not None:
                return
            scheduled = _pending(db, prefix).get(prefix)
        if (scheduled and scheduled.timestamp() > horizon) or not self._has_files(prefix):
            return
        why = (f"its deletion is still pending since {scheduled:%H:%M:%S}" if scheduled
               else "nothing scheduled")
        self.journal.violate("no object without its row",
                             f"{prefix} is in the store with no {column.table} row ({why}); "
                             f"it holds {self._keys(prefix)}", key=prefix)

    # -- usage ------------------------------------------------------------------------------
    def usage_matches(self, api_url: str) -> None:
        for state in self.tenants.states:
            with self.engine.connect() as db:
                datasets, dataset_bytes = db.execute(select(
                    func.count(), func.coalesce(func.sum(Dataset.size_bytes), 0)).where(
                    Dataset.tenant_id == state.tenant_id)).one()
                models = db.execute(select(TunedModel.id, TunedModel.size_bytes,
                                           TunedModel.exports_bytes).where(
                    TunedModel.tenant_id == state.tenant_id)).all()
            stored = int(dataset_bytes) + sum(m.size_bytes + m.exports_bytes for m in models)
            for model in models:
                self._model_sizes(model.id, model.size_bytes, model.exports_bytes)
            with httpx.Client(base_url=api_url, timeout=60,
                              headers={"Authorization": f"Bearer {state.key}"}) as http:
                answer = http.get("/v1/usage")
            if answer.status_code != 200:
                self.journal.violate("usage equals what is stored", f"{state.name}'s usage: "
                                     f"{answer.status_code} {answer.text[:200]}")
                continue
            usage = answer.json()["usage"]
            if (usage["stored_bytes"], usage["datasets"]) != (stored, datasets):
                self.journal.violate(
                    "usage equals what is stored",
                    f"{state.name}: usage says {usage['stored_bytes']} bytes in "
                    f"{usage['datasets']} datasets; the rows hold {stored} bytes in {datasets}",
                    key=state.name)

    def _model_sizes(self, model_id: str, size: int, exports: int) -> None:
        bundle = self.blobs / "models" / model_id / "bundle.tar"
        built = self.blobs / "exports" / model_id
        on_disk = sum(p.stat().st_size for p in built.rglob("*") if _stored(p)) \
            if built.is_dir() else 0
        if (bundle.is_file() and bundle.stat().st_size != size) or on_disk != exports:
            self.journal.violate(
                "usage equals what is stored",
                f"model {model_id}: rows say bundle {size} and exports {exports} bytes; the "
                f"store holds {bundle.stat().st_size if bundle.is_file() else 'no'} bundle "
                f"bytes and {on_disk} export bytes", key=f"sizes:{model_id}")
