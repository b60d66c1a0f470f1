"""Per-tenant quotas: what a tenant holds and uses, against its limits.

Checked at submit (stored bytes, datasets, queued plus running jobs, epochs × images, keys):
over a limit is a 429 naming it, and nothing is stored. Limits that bite only while jobs run
(running jobs, compute hours per rolling 24 h) hold jobs back in the dispatcher instead.

What is counted and then added (a dataset, a key) is checked again at insert under
``lock_tenant``, in the database, so requests racing on several API processes cannot all pass
a check that only one of them fits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from ftune.service.db.tables import ApiKey, Dataset, Job, JobRun, Tenant, TunedModel, utcnow
from ftune.service.db.writes import rows_changed
from ftune.service.errors import NotFound, TooManyRequests
from ftune.service.job_status import ACTIVE, JobStatus
from ftune.service.settings import Settings

GB = 2**30
DAY = timedelta(hours=24)
RUNNING = (JobStatus.ADMITTED, JobStatus.RUNNING)  # what takes (or is about to take) a worker


@dataclass(frozen=True)
class Limits:
    stored_bytes: int
    datasets: int
    active_jobs: int
    running_jobs: int
    epoch_images: int
    compute_s: float  # per rolling 24 h
    keys: int  # not revoked, not expired
    uploads_at_once: int  # streamed and unpacked at once, over every API process


@dataclass(frozen=True)
class Usage:
    stored_bytes: int
    datasets: int
    active_jobs: int
    running_jobs: int
    compute_s: float
    keys: int


def limits_of(tenant: Tenant | None, settings: Settings) -> Limits:
    own = tenant.quotas if tenant is not None else {}

    def pick(name: str, default: float) -> float:
        return own.get(name, default) if own.get(name) is not None else default

    return Limits(
        stored_bytes=int(pick("stored_gb", settings.quota_stored_gb) * GB),
        datasets=int(pick("datasets", settings.quota_datasets)),
        active_jobs=int(pick("active_jobs", settings.quota_active_jobs)),
        running_jobs=int(pick("running_jobs", settings.quota_running_jobs)),
        epoch_images=int(pick("epoch_images", settings.quota_epoch_images)),
        compute_s=float(pick("compute_hours", settings.quota_compute_hours)) * 3600,
        keys=int(pick("keys", settings.max_keys_per_tenant)),
        uploads_at_once=int(pick("uploads_at_once", settings.max_uploads_per_tenant)))


def usage_of(session: Session, tenant_id: str) -> Usage:
    datasets, dataset_bytes = session.execute(
        select(func.count(), func.coalesce(func.sum(Dataset.size_bytes), 0))
        .where(Dataset.tenant_id == tenant_id)).one()
    model_bytes = session.scalar(
        select(func.coalesce(func.sum(TunedModel.size_bytes + TunedModel.exports_bytes), 0))
        .where(TunedModel.tenant_id == tenant_id))
    by_status = dict(session.execute(
        select(Job.status, func.count()).where(Job.tenant_id == tenant_id,
                                               Job.status.in_(ACTIVE)).group_by(Job.status)
    ).all())
    return Usage(
        stored_bytes=int(dataset_bytes) + int(model_bytes or 0), datasets=int(datasets),
        active_jobs=sum(by_status.values()),
        running_jobs=sum(by_status.get(s, 0) for s in RUNNING),
        compute_s=compute_seconds(session, [tenant_id]).get(tenant_id, 0.0),
        keys=live_keys(session, tenant_id))


def live_keys(session: Session, tenant_id: str) -> int:
    """The tenant's keys that still work: revoked and expired ones do not count."""
    return int(session.scalar(select(func.count()).select_from(ApiKey).where(
        ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None),
        or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > utcnow()))) or 0)


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Hold the tenant's row until this transaction ends, so that counting what the tenant
    holds and adding to it happen one request at a time, over every API process.

    A write, not SELECT ... FOR UPDATE: on PostgreSQL it takes the row's lock; on SQLite (no
    row locks, FOR UPDATE ignored) the database's one write lock, and a transaction whose
    first statement writes waits for it (busy_timeout) and then reads what was committed
    before. So call it before anything else is read in the transaction."""
    touched = rows_changed(session, update(Tenant).where(Tenant.id == tenant_id)
                           .values(name=Tenant.name)
                           .execution_options(synchronize_session=False))
    if not touched:
        raise NotFound(f"tenant {tenant_id} not found (it was removed)")


def compute_seconds(session: Session, tenant_ids: list[str],
                    now: datetime | None = None) -> dict[str, float]:
    """Seconds jobs of each tenant ran on workers in the 24 hours before ``now``."""
    now = now or utcnow()
    since = now - DAY
    totals = dict.fromkeys(tenant_ids, 0.0)
    rows = session.execute(select(JobRun.tenant_id, JobRun.started_at, JobRun.ended_at).where(
        JobRun.tenant_id.in_(tenant_ids), or_(JobRun.ended_at.is_(None),
                                              JobRun.ended_at > since)))
    for tenant_id, started, ended in rows:
        span = (min(ended or now, now) - max(started, since)).total_seconds()
        totals[tenant_id] += max(0.0, span)
    return totals


def _over(name: str, used: str, limit: str) -> TooManyRequests:
    return TooManyRequests(f"quota {name} exceeded: {used} of {limit}; free some (delete "
                           "datasets, models, exports or finished jobs) or ask an operator to "
                           "raise it")


def upload_allowance(usage: Usage, limits: Limits) -> int:
    """Bytes an upload may still add; 429 when the tenant may not upload at all."""
    if usage.datasets >= limits.datasets:
        raise _over("datasets", f"{usage.datasets} datasets", f"{limits.datasets}")
    left = limits.stored_bytes - usage.stored_bytes
    if left <= 0:
        raise _over("stored_gb", _gb(usage.stored_bytes), _gb(limits.stored_bytes))
    return left


def check_new_dataset(usage: Usage, limits: Limits, size_bytes: int) -> None:
    """At insert, under ``lock_tenant``: the dataset still fits (others may have committed
    since the upload began)."""
    if usage.datasets >= limits.datasets:
        raise _over("datasets", f"{usage.datasets} datasets", f"{limits.datasets}")
    if usage.stored_bytes + size_bytes > limits.stored_bytes:
        raise _over("stored_gb", f"{_gb(usage.stored_bytes)} stored and "
                    f"{_gb(size_bytes)} more", _gb(limits.stored_bytes))


def check_new_key(session: Session, tenant_id: str, settings: Settings) -> None:
    """Under ``lock_tenant``: one more key stays within the tenant's ``keys`` limit, which
    bounds how far the per-key rate limits and stream caps multiply."""
    limit = limits_of(session.get(Tenant, tenant_id), settings).keys
    held = live_keys(session, tenant_id)
    if held >= limit:
        raise TooManyRequests(f"quota keys exceeded: {held} keys of {limit} "
                              "(FTUNE_MAX_KEYS_PER_TENANT, or the tenant's keys quota); revoke "
                              "one (DELETE /v1/keys/{id}) or ask an operator to raise it")


def check_job(usage: Usage, limits: Limits, *, epochs: int, images: int) -> None:
    if usage.active_jobs >= limits.active_jobs:
        raise _over("active_jobs", f"{usage.active_jobs} queued or running jobs",
                    f"{limits.active_jobs}")
    if usage.stored_bytes >= limits.stored_bytes:
        raise _over("stored_gb", _gb(usage.stored_bytes), _gb(limits.stored_bytes))
    if epochs * images > limits.epoch_images:
        raise _over("epoch_images", f"{epochs} epochs × {images} images = {epochs * images}",
                    f"{limits.epoch_images}")


def _gb(n: int) -> str:
    return f"{n / GB:.3f} GB"


def usage_view(usage: Usage, limits: Limits) -> dict:
    return {"usage": asdict(usage), "limits": asdict(limits)}
