"""A bundle stored for a model the worker then could not record is removed at once, even
when recording failed because the database is down (found by the soak: PostgreSQL restarting
at that moment left bundles with no row and nothing scheduled), and the hold that covers a
worker killed between storing a bundle and recording its model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ftune.service.blobs import deletions
from ftune.service.blobs.base import BlobMissing
from ftune.service.blobs.keys import model_key, prefixes_of
from ftune.service.db.session import Database
from ftune.service.db.tables import DEFAULT_TENANT_ID, BlobDeletion, Job, TunedModel
from ftune.service.ids import new_id
from ftune.service.job_status import JobStatus
from ftune.service.storage import Storage
from ftune.workers.runner import JobRunner, RunLimits, RunTimings

from .conftest import DATASET_ID

MODEL = "b" * 32


def test_a_bundle_is_removed_when_the_database_is_down(tmp_path):
    storage = Storage(tmp_path / "home")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")
    storage.put_tree(model_key(MODEL), bundle)
    # A database that cannot be reached: its file's folder does not exist.
    down = Database(f"sqlite:///{tmp_path / 'gone' / 'ftune.db'}")
    runner = JobRunner(down, storage, worker_name="w1",
                       timings=RunTimings(1, 1, 1, 10), limits=RunLimits(60, 1, 0))
    try:
        runner._discard_model(MODEL)
    finally:
        down.dispose()
    with pytest.raises(BlobMissing):
        storage.blobs.read(model_key(MODEL))


def _running_job(db: Database) -> str:
    with db.session() as session:
        job = Job(tenant_id=DEFAULT_TENANT_ID, dataset_id=DATASET_ID, status=JobStatus.RUNNING,
                  spec={}, epochs=1, worker="w1", attempts=1)
        session.add(job)
        session.flush()
        return job.id


def _model(job_id: str) -> TunedModel:
    return TunedModel(id=new_id(), tenant_id=DEFAULT_TENANT_ID, job_id=job_id, name="m",
                      dataset_id=DATASET_ID, size_bytes=1, blob_sha256="0" * 64,
                      dataset_hash="h", backbone="b", classes=["a", "b"], spec={}, metrics={})


@pytest.mark.parametrize("claimed", [False, True])
def test_recording_a_model_takes_its_bundle_s_hold_back_unless_the_upkeep_claimed_it(
        database, tmp_path, claimed):
    """The worker holds a bundle's prefixes before storing it (so its death before the row
    leaves nothing for long); recording the model releases them in the same transaction,
    and a hold already claimed as due makes recording fail instead of pointing a row at
    objects being removed."""
    storage = Storage(tmp_path / "home")
    runner = JobRunner(database, storage, worker_name="w1",
                       timings=RunTimings(1, 1, 1, 10), limits=RunLimits(60, 1, 0))
    job_id = _running_job(database)
    record = _model(job_id)
    with database.session() as session:
        deletions.hold(session, prefixes_of(models=[record.id]), hold_s=0 if claimed else 60)
    if claimed:
        deletions.remove(database, storage.blobs)  # the upkeep finds it due
    result = SimpleNamespace(stopped_early=False, diagnosis=[])
    if claimed:
        with pytest.raises(deletions.HoldLost):
            runner._record_success(job_id, 1, record, {}, result)  # type: ignore[arg-type]
    else:
        assert runner._record_success(job_id, 1, record, {}, result)  # type: ignore[arg-type]
    with database.session() as session:
        assert session.query(BlobDeletion).count() == 0
        assert (session.get(TunedModel, record.id) is None) == claimed
        assert session.get(Job, job_id).status == (  # type: ignore[union-attr]
            JobStatus.RUNNING if claimed else JobStatus.SUCCEEDED)
