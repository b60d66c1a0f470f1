"""Removing a tenant and everything it owns: rows first (in one transaction), files after."""

from __future__ import annotations

from sqlalchemy import delete, select, update

from ftune.service.auth.principal import Principal
from ftune.service.auth.tenants import visible_tenant
from ftune.service.db.session import Database
from ftune.service.db.tables import (
    DEFAULT_TENANT_ID,
    ApiKey,
    Dataset,
    EpochMetrics,
    IdempotencyKey,
    Job,
    JobEvent,
    JobRun,
    ModelAlias,
    Sweep,
    SweepTrial,
    TunedModel,
)
from ftune.service.errors import Conflict
from ftune.service.storage import Storage


def remove_tenant(db: Database, storage: Storage, principal: Principal, ref: str) -> None:
    """Stop the tenant's jobs and delete its datasets, jobs, sweeps, models, downloads and keys.
    A job still running stops at its next batch (its job is gone)."""
    with db.session() as session:
        tenant = visible_tenant(session, principal, ref)
        if tenant.id == DEFAULT_TENANT_ID:
            raise Conflict("the default tenant cannot be removed")
        owned = {table: list(session.scalars(select(table.id).where(table.tenant_id ==
                                                                     tenant.id)))
                 for table in (Dataset, Job, TunedModel)}
        jobs = owned[Job]
        sweeps = list(session.scalars(select(Sweep.id).where(Sweep.tenant_id == tenant.id)))
        session.execute(update(Job).where(Job.id.in_(jobs)).values(cancel_requested=True))
        for table in (EpochMetrics, JobEvent, JobRun):
            session.execute(delete(table).where(table.job_id.in_(jobs)))
        session.execute(delete(JobEvent).where(JobEvent.job_id.in_(sweeps)))  # sweep events
        session.execute(delete(SweepTrial).where(SweepTrial.sweep_id.in_(sweeps)))
        session.execute(delete(Sweep).where(Sweep.id.in_(sweeps)))
        session.execute(delete(ModelAlias).where(ModelAlias.tenant_id == tenant.id))
        session.execute(delete(TunedModel).where(TunedModel.tenant_id == tenant.id))
        for table in (Job, Dataset, IdempotencyKey, ApiKey):
            session.execute(delete(table).where(table.tenant_id == tenant.id))
        session.delete(tenant)
    for dataset_id in owned[Dataset]:
        storage.remove_dataset_files(dataset_id)
    for model_id in owned[TunedModel]:
        storage.remove_model_files(model_id)
    for job_id in jobs:
        storage.remove_job_files(job_id)
