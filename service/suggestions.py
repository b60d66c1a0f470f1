"""Suggest jobs: which of a dataset's unlabelled images to label next, ranked by a tuned
model on a worker (workers/suggesting.py). Checked and queued here like fine-tuning jobs:
the same quotas, dispatcher, progress, cancel and events; the ranking is the job's result."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session

from ftune.service.auth.principal import Principal, Role
from ftune.service.datasets import get_dataset
from ftune.service.db.session import Database
from ftune.service.db.tables import Job, Tenant
from ftune.service.errors import InvalidInput
from ftune.service.events import status_event
from ftune.service.job_status import JobKind, JobStatus
from ftune.service.jobs import MEMBER_MAX_PRIORITY, dispatch_or_fail
from ftune.service.quotas import check_job, limits_of, usage_of
from ftune.service.schemas import SuggestionsIn
from ftune.service.settings import Settings
from ftune.service.tuned_models import get_model


def create_suggestions_job(session: Session, principal: Principal, settings: Settings, *,
                           model_ref: str, request: SuggestionsIn) -> Job:
    """A queued suggest job in the model's tenant (404 for a model or dataset the caller
    cannot see, 422 for a dataset that is not unlabelled images of that tenant, 429 over a
    quota)."""
    model = get_model(session, principal, model_ref)
    dataset = get_dataset(session, principal, request.unlabeled_dataset_id)
    if dataset.kind != "unlabeled" or dataset.tenant_id != model.tenant_id:
        raise InvalidInput(f"unlabeled_dataset_id: dataset {dataset.id} is not a dataset of "
                           "unlabelled images of the model's tenant; upload them with the "
                           "form field kind=unlabeled", loc=["body", "unlabeled_dataset_id"])
    if request.priority > MEMBER_MAX_PRIORITY:
        principal.require(Role.ADMIN, f"priority above {MEMBER_MAX_PRIORITY}")
    tenant_id = model.tenant_id
    # One pass of the model over the images: one epoch's worth of the epoch-images quota.
    check_job(usage_of(session, tenant_id), limits_of(session.get(Tenant, tenant_id), settings),
              epochs=1, images=dataset.num_images)
    job = Job(kind=JobKind.SUGGEST, tenant_id=tenant_id, dataset_id=dataset.id,
              spec={"model_id": model.id, "count": request.count, "measure": request.measure},
              epochs=1, status=JobStatus.QUEUED, priority=request.priority, resolved={},
              model_name=model.name)
    session.add(job)
    session.flush()
    status_event(session, job.id, JobStatus.QUEUED, priority=request.priority)
    return job


def submit_suggestions(db: Database, principal: Principal, settings: Settings, *,
                       model_ref: str, request: SuggestionsIn,
                       dispatch: Callable[[], object]) -> str:
    """Record the suggest job and ask the dispatcher to start it; returns its id."""
    with db.session() as session:
        job_id = create_suggestions_job(session, principal, settings, model_ref=model_ref,
                                        request=request).id
    dispatch_or_fail(db, principal, job_id, None, dispatch)
    return job_id
