"""Removing a tenant and everything it owns: rows first (in one transaction), files after."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from ftune.service.auth.principal import Principal
from ftune.service.auth.tenants import visible_tenant
from ftune.service.blobs import deletions
from ftune.service.blobs.keys import prefixes_of
from ftune.service.db.session import Database
from ftune.service.db.tables import (
    DEFAULT_TENANT_ID,
    ApiKey,
    Dataset,
    IdempotencyKey,
    Job,
    JobEvent,
    ModelAlias,
    Sweep,
    SweepTrial,
    TunedModel,
)
from ftune.service.errors import Conflict
from ftune.service.jobs import delete_job_children
from ftune.service.storage import Storage


def remove_tenant(db: Database, storage: Storage, principal: Principal, ref: str) -> None:
    """Stop the tenant's jobs and delete its datasets, jobs, sweeps, models, downloads and keys.
    A job still running stops at its next batch (its job is gone)."""
    with db.session() as session:
        tenant = visible_tenant(session, principal, ref)
        if tenant.id == DEFAULT_TENANT_ID:
            raise Conflict("the default tenant cannot be removed")
        owned = _delete_rows(session, tenant.id)
        session.delete(tenant)
        doomed = deletions.schedule(session, prefixes_of(
            datasets=owned.datasets, models=owned.models, jobs=owned.jobs))
    deletions.remove(db, storage.blobs, doomed)


@dataclass(frozen=True)
class _Owned:
    """The ids whose files go once the rows are gone."""

    datasets: list[str]
    jobs: list[str]
    models: list[str]


def _delete_rows(session: Session, tenant_id: str) -> _Owned:
    """Every row of the tenant but its own, children before what they point at."""
    owned = _Owned(
        datasets=list(session.scalars(select(Dataset.id).where(Dataset.tenant_id == tenant_id))),
        jobs=list(session.scalars(select(Job.id).where(Job.tenant_id == tenant_id))),
        models=list(session.scalars(select(TunedModel.id).where(
            TunedModel.tenant_id == tenant_id))))
    sweeps = list(session.scalars(select(Sweep.id).where(Sweep.tenant_id == tenant_id)))
    session.execute(update(Job).where(Job.id.in_(owned.jobs)).values(cancel_requested=True))
    delete_job_children(session, owned.jobs)
    session.execute(delete(JobEvent).where(JobEvent.job_id.in_(sweeps)))  # sweep events
    session.execute(delete(SweepTrial).where(SweepTrial.sweep_id.in_(sweeps)))
    session.execute(delete(Sweep).where(Sweep.id.in_(sweeps)))
    session.execute(delete(ModelAlias).where(ModelAlias.tenant_id == tenant_id))
    session.execute(delete(TunedModel).where(TunedModel.tenant_id == tenant_id))
    session.execute(delete(Job).where(Job.tenant_id == tenant_id))
    session.execute(delete(Dataset).where(Dataset.tenant_id == tenant_id))
    # Sweeps' keys too, and any whose job is gone already.
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id))
    session.execute(delete(ApiKey).where(ApiKey.tenant_id == tenant_id))
    return owned
