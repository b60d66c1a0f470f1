"""Run a suggest job: the tenant's tuned model ranks a dataset of unlabelled images for
labelling (models/suggestion_run.py), and the ranking becomes the job's result."""

from __future__ import annotations

import logging
from pathlib import Path

from ftune.models.derived.store import DerivedStore
from ftune.models.errors import DatasetError
from ftune.service.blobs.base import BlobMissing
from ftune.service.blobs.keys import model_key
from ftune.service.db.session import Database
from ftune.service.db.tables import TunedModel
from ftune.service.lifecycle import transitions
from ftune.service.lifecycle.transitions import ClaimedJob
from ftune.service.storage import Storage
from ftune.workers.progress import ProgressReporter
from ftune.workers.run_files import RunFiles

log = logging.getLogger(__name__)


def run_suggestions(db: Database, storage: Storage, derived: DerivedStore | None,
                    job: ClaimedJob, files: RunFiles, reporter: ProgressReporter,
                    worker: str) -> bool:
    """Whether the ranking was recorded (False: another worker took the job over)."""
    from ftune.models.suggestion_run import suggest

    spec = job.spec
    bundle = _model_files(db, storage, job)
    data = files.dataset(job.dataset_id, job.dataset_sha256, job.tenant_id)
    reporter.on_stage("score", 1, 0)  # one pass of the model over the images
    picks = suggest(bundle, data, int(spec["count"]), measure=spec.get("measure", "margin"),
                    derived=derived, owner=job.tenant_id, model_id=spec["model_id"],
                    on_progress=lambda done, total: reporter.on_batch_end(1, done, total, 0.0),
                    should_stop=reporter.should_stop)
    result = {"model_id": spec["model_id"], "measure": spec.get("measure", "margin"),
              "suggestions": picks}
    with db.session() as session:
        done = transitions.succeed_with_result(session, job.id, worker, result,
                                               attempt=job.attempts)
    if not done:
        log.warning("job %s is no longer ours to finish; its ranking is dropped", job.id)
        return False
    log.info("job %s ranked %d images for labelling", job.id, len(picks))
    return True


def _model_files(db: Database, storage: Storage, job: ClaimedJob) -> Path:
    """The tuned model's files on this host; a DatasetError (the user's to fix) when it was
    deleted since the job was submitted."""
    model_id = job.spec["model_id"]
    with db.session() as session:
        model = session.get(TunedModel, model_id)
        sha256 = model.blob_sha256 if model is not None else None
        tenant = model.tenant_id if model is not None else None
    if sha256 is None or tenant != job.tenant_id:
        raise DatasetError(f"model {model_id} no longer exists: submit the suggestions again "
                           "with another model")
    try:
        return storage.local_tree(model_key(model_id), sha256, owner=job.tenant_id)
    except BlobMissing:
        raise DatasetError(f"model {model_id}'s files are gone from the store") from None
