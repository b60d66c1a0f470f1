"""The worker's progress reporter: progress writes and cancel polls keep their own intervals
(FTUNE_PROGRESS_INTERVAL_S, FTUNE_CANCEL_POLL_S), and it hands the engine all its hooks."""

from __future__ import annotations

import threading
import time

import pytest

from ftune.service.db.session import Database
from ftune.service.db.tables import DEFAULT_TENANT_ID, Job, JobEvent
from ftune.service.job_status import JobStatus
from ftune.workers.progress import ProgressReporter


@pytest.fixture
def db(database):
    with database.session() as session:
        session.add(Job(id="j" * 32, tenant_id=DEFAULT_TENANT_ID, dataset_id="d" * 32,
                        spec={}, epochs=1, status=JobStatus.RUNNING, worker="w1"))
    return database


def _reporter(db: Database, *, progress_s: float, cancel_poll_s: float) -> ProgressReporter:
    return ProgressReporter(db, "j" * 32, "w1", progress_s=progress_s,
                            cancel_poll_s=cancel_poll_s, shutdown=threading.Event())


def _steps_written(db: Database) -> int:
    with db.session() as session:
        job = session.get(Job, "j" * 32)
        assert job is not None
        return job.step


def test_progress_is_written_at_its_own_interval(db):
    reporter = _reporter(db, progress_s=3600, cancel_poll_s=0.001)
    reporter.on_batch_end(1, 1, 10, 0.5)  # the first batch is written
    reporter.on_batch_end(1, 2, 10, 0.5)  # within the interval: not written
    assert _steps_written(db) == 1
    reporter.on_batch_end(1, 10, 10, 0.5)  # an epoch's last step always is
    assert _steps_written(db) == 10
    with db.session() as session:
        kinds = [e.kind for e in session.query(JobEvent).filter_by(job_id="j" * 32)]
    assert kinds == ["progress", "progress"]


def test_a_cancel_is_seen_between_sparse_progress_writes(db):
    reporter = _reporter(db, progress_s=3600, cancel_poll_s=0.001)
    reporter.on_batch_end(1, 1, 10, 0.5)
    assert not reporter.should_stop()
    with db.session() as session:
        job = session.get(Job, "j" * 32)
        assert job is not None
        job.cancel_requested = True
    reporter.on_batch_end(1, 2, 10, 0.5)  # not written: progress is an hour apart
    time.sleep(0.01)  # past cancel_poll_s since the last look (a fast machine got there first)
    assert reporter.should_stop()  # but the cancel poll looked anyway
    assert _steps_written(db) == 1


def test_the_engine_gets_every_hook(db):
    callbacks = _reporter(db, progress_s=1, cancel_poll_s=1).callbacks()
    hooks = vars(callbacks)
    assert hooks and all(hook is not None for hook in hooks.values()), hooks
