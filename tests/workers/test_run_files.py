"""What a worker stores for a job: its last log lines never outlive the job's row."""

from __future__ import annotations

import pytest
from sqlalchemy import delete

from ftune.service.blobs.base import BlobMissing
from ftune.service.blobs.keys import log_key
from ftune.service.db.tables import DEFAULT_TENANT_ID, Job
from ftune.service.job_status import JobStatus
from ftune.service.storage import Storage
from ftune.workers.run_files import RunFiles

JOB = "a" * 32  # ids are hex


@pytest.fixture
def db(database):
    with database.session() as session:
        session.add(Job(id=JOB, tenant_id=DEFAULT_TENANT_ID, dataset_id="d" * 32, spec={},
                        epochs=1, status=JobStatus.SUCCEEDED))
    return database


def test_the_last_log_lines_of_a_job_deleted_as_it_ended_are_not_left_behind(db, tmp_path):
    """Found by the soak: a job deleted the moment it succeeded, before its worker stored its
    last log lines, left them in the store with no row."""
    storage = Storage(tmp_path / "home")
    files = RunFiles(db, storage, "w1", JOB, 1)
    files.log_path.parent.mkdir(parents=True)
    files.log_path.write_text('{"message": "job ended: succeeded"}\n')
    files.ship_log()  # the job exists: its log is kept
    assert storage.blobs.read(log_key(JOB, 1))
    with db.session() as session:
        session.execute(delete(Job).where(Job.id == JOB))
    files.clean_up()  # the last lines, after the row went
    with pytest.raises(BlobMissing):
        storage.blobs.read(log_key(JOB, 1))
