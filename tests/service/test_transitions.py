"""The job state machine on real databases, SQLite and PostgreSQL: claims never double-run a
job, and a worker that lost its job can no longer change it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ftune.service.auth.principal import LOCAL_USER
from ftune.service.db import migrate
from ftune.service.db.session import Database
from ftune.service.db.tables import DEFAULT_TENANT_ID, Dataset, Job, JobRun, TunedModel, utcnow
from ftune.service.job_status import JobStatus
from ftune.service.jobs import cancel_job
from ftune.service.lifecycle import transitions


@pytest.fixture
def db(database_url):
    database = Database(database_url, prepare=migrate.upgrade)
    with database.session() as session:
        session.add(Dataset(id="d" * 32, tenant_id=DEFAULT_TENANT_ID, name="d",
                            classes=["a", "b"], class_counts={}, num_images=2, splits={},
                            warnings=[]))
    yield database
    database.dispose()


def _job(db, **values) -> str:
    """A job as the dispatcher leaves it (admitted), unless ``values`` say otherwise."""
    values = {"status": JobStatus.ADMITTED, **values}
    with db.session() as session:
        job = Job(tenant_id=DEFAULT_TENANT_ID, dataset_id="d" * 32, spec={}, epochs=1,
                  **values)
        session.add(job)
        session.flush()
        return job.id


def test_an_admitted_job_is_claimed_once_and_a_queued_one_not_at_all(db):
    with db.session() as session:  # not admitted by the dispatcher: a stale message
        assert transitions.claim(session, _job(db, status=JobStatus.QUEUED), "w1",
                                 stale_after_s=60) is None
    job_id = _job(db)
    with db.session() as session:
        claimed = transitions.claim(session, job_id, "w1", stale_after_s=60)
        assert claimed is not None and claimed.attempts == 1
        assert session.get(Job, job_id).status == "running"
    with db.session() as session:
        # A duplicate delivery while the first worker is alive must not run it again.
        assert transitions.claim(session, job_id, "w2", stale_after_s=60) is None
        assert session.get(Job, job_id).worker == "w1"


def test_an_abandoned_running_job_is_taken_over(db):
    job_id = _job(db, status=JobStatus.RUNNING, attempts=1,
                  heartbeat_at=utcnow() - timedelta(seconds=600))
    with db.session() as session:
        claimed = transitions.claim(session, job_id, "w2", stale_after_s=60)
        assert claimed is not None and claimed.attempts == 2
        assert session.get(Job, job_id).worker == "w2"


def test_cancel_wins_over_a_later_claim_and_a_cancelled_job_never_succeeds(db):
    job_id = _job(db)
    with db.session() as session:
        assert cancel_job(session, LOCAL_USER, job_id=job_id).status == "cancelled"
    with db.session() as session:
        assert transitions.claim(session, job_id, "w1", stale_after_s=60) is None
    with db.session() as session:
        model = TunedModel(id="m" * 32, tenant_id=DEFAULT_TENANT_ID, job_id=job_id,
                           dataset_id="d" * 32, backbone="x", classes=[], metrics={}, spec={})
        assert transitions.succeed(session, job_id, "w1", model, {}, False) is False
    with db.session() as session:
        assert session.get(Job, job_id).status == "cancelled"
        assert session.get(TunedModel, "m" * 32) is None


def test_epoch_rows_are_written_once_per_epoch(db):
    job_id = _job(db, status=JobStatus.RUNNING, worker="w1")
    with db.session() as session:
        assert transitions.record_epoch(session, job_id, "w1", {"epoch": 1, "train_loss": 2.0})
    with db.session() as session:  # a resumed attempt reports epoch 1 again
        transitions.record_epoch(session, job_id, "w1", {"epoch": 1, "train_loss": 1.5})
        transitions.record_epoch(session, job_id, "w1", {"epoch": 2, "train_loss": 1.0})
    from ftune.service.jobs import epoch_rows

    with db.session() as session:
        assert [r["epoch"] for r in epoch_rows(session, job_id)] == [1, 2]
        assert session.get(Job, job_id).epoch == 2


def test_reconciler_requeues_abandoned_jobs_and_gives_up_after_max_attempts(db, redis_url,
                                                                            tmp_path):
    import redis as redis_lib

    from ftune.service.lifecycle.reconciler import broker_job_ids, reconcile
    from ftune.service.queue import make_celery
    from ftune.service.settings import Settings

    # A database of its own on the shared Redis: no running worker consumes what is enqueued.
    isolated = redis_url.rsplit("/", 1)[0] + "/7"
    client = redis_lib.Redis.from_url(isolated)
    settings = Settings(home=tmp_path, redis_url=isolated, job_stale_s=30, max_attempts=2,
                        reconcile_interval_s=10)
    old = utcnow() - timedelta(seconds=60)
    retry_id = _job(db, status=JobStatus.RUNNING, attempts=1, heartbeat_at=old)
    give_up_id = _job(db, status=JobStatus.RUNNING, attempts=2, heartbeat_at=old)
    fresh_id = _job(db, status=JobStatus.RUNNING, attempts=1, heartbeat_at=utcnow())
    # Admitted 15 s ago (past the reconciler's grace, before job_stale_s), but its message is
    # gone from Redis.
    lost_id = _job(db, admitted_at=utcnow() - timedelta(seconds=15))
    celery = make_celery(settings)
    try:
        repairs = reconcile(db, celery, client, settings)
        assert repairs.requeued == [retry_id] and repairs.failed == [give_up_id]
        with db.session() as session:
            # Back to the dispatcher, which decides when it runs again; not enqueued here.
            assert session.get(Job, retry_id).status == "queued"
            assert session.get(Job, fresh_id).status == "running"
            failed = session.get(Job, give_up_id)
            assert failed.status == "failed" and "stopped responding 2 time(s)" in failed.error
        assert repairs.reenqueued == [lost_id]
        assert broker_job_ids(client) == {lost_id}
    finally:
        for key in client.scan_iter(match="training*"):
            client.delete(key)


def test_a_worker_that_lost_its_job_can_no_longer_write_to_it(db):
    job_id = _job(db)
    with db.session() as session:
        transitions.claim(session, job_id, "paused", stale_after_s=60)
    with db.session() as session:  # taken over while "paused" was frozen
        session.get(Job, job_id).heartbeat_at = utcnow() - timedelta(seconds=600)
    with db.session() as session:
        assert transitions.claim(session, job_id, "rescuer", stale_after_s=60) is not None
    with db.session() as session:
        assert not transitions.beat(session, job_id, "paused")
        assert transitions.record_progress(session, job_id, "paused", 1, 1, 2, 0.5,
                                         event=True) == "lost"
        assert not transitions.record_epoch(session, job_id, "paused", {"epoch": 1})
        assert transitions.record_progress(session, job_id, "rescuer", 1, 1, 2, 0.5,
                                         event=False) == "ok"


def test_failure_messages_say_what_to_change():
    from ftune.models.errors import UnknownBackboneError
    from ftune.workers.failures import describe_failure

    cpu = describe_failure(RuntimeError("DefaultCPUAllocator: can't allocate memory: 9 GB"))
    assert cpu.startswith("out of memory on the worker") and "batch_size" in cpu
    gpu = describe_failure(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert gpu.startswith("out of GPU memory")
    assert describe_failure(UnknownBackboneError("no_such_net")).startswith("unknown backbone")
    assert "report it" in describe_failure(ZeroDivisionError("boom"))


def test_a_claim_returns_what_the_run_needs(db):
    job_id = _job(db, status=JobStatus.RUNNING, attempts=1, resolved={"image_size": 224},
                  heartbeat_at=utcnow() - timedelta(seconds=600))
    with db.session() as session:  # the dead worker's run: it counts against the job's limit
        session.add(JobRun(job_id=job_id, tenant_id=DEFAULT_TENANT_ID, worker="dead",
                           started_at=utcnow() - timedelta(seconds=630)))
    with db.session() as session:
        claimed = transitions.claim(session, job_id, "w2", stale_after_s=60)
    assert claimed is not None and claimed.id == job_id and claimed.attempts == 2
    assert claimed.tenant_id == DEFAULT_TENANT_ID and claimed.dataset_id == "d" * 32
    assert claimed.resolved == {"image_size": 224}
    assert claimed.model_name == "d"  # no model_name of its own: the dataset's
    assert 29 < claimed.seconds_run < 60  # closed at the dead worker's last heartbeat
    assert claimed.sweep_id is None and claimed.objective == "val_loss"


def test_runs_are_recorded_for_compute_quotas_and_run_time(db):
    job_id = _job(db)
    with db.session() as session:
        transitions.claim(session, job_id, "w1", stale_after_s=60)
    with db.session() as session:
        runs = session.query(JobRun).filter_by(job_id=job_id).all()
        assert len(runs) == 1 and runs[0].ended_at is None and runs[0].worker == "w1"
        runs[0].started_at = utcnow() - timedelta(seconds=30)  # as if it ran half a minute
    with db.session() as session:
        transitions.requeue(session, job_id, "test", "w1")
    with db.session() as session:
        assert 29 < transitions.run_seconds(session, job_id) < 60
        assert session.get(Job, job_id).status == "queued"


def test_an_admitted_job_no_worker_started_goes_back_to_the_dispatcher(db, redis_url, tmp_path):
    import redis as redis_lib

    from ftune.service.lifecycle.reconciler import reconcile
    from ftune.service.queue import make_celery
    from ftune.service.settings import Settings

    isolated = redis_url.rsplit("/", 1)[0] + "/7"
    settings = Settings(home=tmp_path, redis_url=isolated, job_stale_s=30)
    stuck = _job(db, admitted_at=utcnow() - timedelta(seconds=60))
    repairs = reconcile(db, make_celery(settings), redis_lib.Redis.from_url(isolated), settings)
    assert repairs.requeued == [stuck]
    with db.session() as session:
        job = session.get(Job, stuck)
        assert job.status == "queued" and job.admitted_at is None


def test_a_job_asked_to_cancel_whose_run_stopped_ends_cancelled_not_queued(db, redis_url,
                                                                           tmp_path):
    """Found by the soak: a running job's worker lost the database (its run ended) after a
    cancel was requested; queued again it waited forever, as the dispatcher never admits a
    job with a cancel request."""
    import redis as redis_lib

    from ftune.service.lifecycle.dispatcher import admit
    from ftune.service.lifecycle.reconciler import reconcile
    from ftune.service.queue import make_celery
    from ftune.service.settings import Settings

    isolated = redis_url.rsplit("/", 1)[0] + "/7"
    settings = Settings(home=tmp_path, redis_url=isolated, job_stale_s=30, max_attempts=3,
                        reconcile_interval_s=10)
    old = utcnow() - timedelta(seconds=60)
    abandoned = _job(db, status=JobStatus.RUNNING, attempts=1, heartbeat_at=old,
                     worker="w1")
    retried = _job(db, status=JobStatus.RUNNING, attempts=1, heartbeat_at=utcnow(),
                   worker="w2")
    with db.session() as session:
        for job_id in (abandoned, retried):
            cancel_job(session, LOCAL_USER, job_id=job_id)
    repairs = reconcile(db, make_celery(settings), redis_lib.Redis.from_url(isolated),
                        settings)
    assert repairs.requeued == [] and repairs.cancelled == [abandoned]
    with db.session() as session:  # a worker's transient error asks to requeue it
        assert not transitions.requeue(session, retried, "transient", "w2")
    with db.session() as session:
        for job_id in (abandoned, retried):
            job = session.get(Job, job_id)
            assert job.status == "cancelled" and "cancelled while running" in job.error
        assert admit(session, settings, workers=[]) == []
