"""The dispatcher's choices on real databases (SQLite and PostgreSQL): fair share across
tenants, priority within one, run-time quotas that hold jobs back, retry times, and jobs
placed on workers with enough devices (best fit)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from ftune.service.db import migrate
from ftune.service.db.session import Database
from ftune.service.db.tables import Job, JobEvent, JobRun, Tenant, utcnow
from ftune.service.job_status import JobStatus
from ftune.service.lifecycle.dispatcher import admit
from ftune.service.lifecycle.liveness import LiveWorker
from ftune.service.settings import Settings

T0 = utcnow() - timedelta(hours=1)


@pytest.fixture
def db(database_url):
    database = Database(database_url, prepare=migrate.upgrade)
    with database.session() as session:
        for name in ("a", "b", "c"):
            session.add(Tenant(id=name * 32, name=name, quotas={}))
    yield database
    database.dispose()


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path)


def _job(db, tenant: str, n: int, status: JobStatus = JobStatus.QUEUED, **values) -> str:
    with db.session() as session:
        job = Job(tenant_id=tenant * 32, dataset_id="d" * 32, epochs=1, status=status,
                  created_at=T0 + timedelta(seconds=n), **{"spec": {}, **values})
        session.add(job)
        session.flush()
        return job.id


def _admit(db, settings, free: int = 0, workers: list[LiveWorker] | None = None) -> list[str]:
    """``free`` one-device workers (no job names them), or these ``workers``."""
    workers = [LiveWorker(f"w{n}@host", 1) for n in range(free)] if workers is None else workers
    with db.session() as session:
        return [job.job_id for job in admit(session, settings, workers=workers)]


def test_a_tenant_with_one_job_is_not_starved_by_one_with_many(db, settings):
    many = [_job(db, "a", n) for n in range(6)]
    _job(db, "a", -1, JobStatus.RUNNING)  # a's first job is on the only worker
    one = _job(db, "b", 10)  # submitted after all of a's
    assert _admit(db, settings, free=2) == [one]  # one worker busy, one free: b's turn
    with db.session() as session:
        session.get(Job, one).status = JobStatus.SUCCEEDED
    assert _admit(db, settings, free=2) == [many[0]]


def test_ties_go_to_the_tenant_that_used_less_compute(db, settings):
    a_job, b_job = _job(db, "a", 0), _job(db, "b", 1)
    with db.session() as session:  # a ran a job for ten minutes in the last hour
        session.add(JobRun(job_id="x" * 32, tenant_id="a" * 32, worker="w",
                           started_at=T0, ended_at=T0 + timedelta(minutes=10)))
    assert _admit(db, settings, free=1) == [b_job]
    assert _admit(db, settings, free=2) == [a_job]  # b's job is admitted: one slot left


def test_priority_then_age_within_a_tenant(db, settings):
    low, high, older_mid, newer_mid = (_job(db, "a", 0, priority=0), _job(db, "a", 1, priority=9),
                                       _job(db, "a", 2), _job(db, "a", 3))
    assert _admit(db, settings, free=4) == [high, older_mid, newer_mid, low]


def test_no_more_than_the_free_workers(db, settings):
    _job(db, "a", 0, JobStatus.ADMITTED)  # admitted: about to take a worker
    jobs = [_job(db, "b", n) for n in range(1, 4)]
    assert _admit(db, settings, free=2) == jobs[:1]
    assert _admit(db, settings, free=0) == []


def test_running_quota_holds_jobs_back_and_says_why(db, settings):
    with db.session() as session:
        session.get(Tenant, "a" * 32).quotas = {"running_jobs": 1}
    _job(db, "a", 0, JobStatus.RUNNING)
    held = _job(db, "a", 1)
    other = _job(db, "b", 2)
    assert _admit(db, settings, free=3) == [other]
    with db.session() as session:
        job = session.get(Job, held)
        assert job.status == "queued" and "quota running_jobs: 1 of 1" in job.hold_reason
        notes = session.scalars(select(JobEvent).where(JobEvent.job_id == held)).all()
        assert [n.data["message"][:9] for n in notes] == ["held back"]
    _admit(db, settings, free=3)  # the same reason again: no second note
    with db.session() as session:
        assert len(session.scalars(select(JobEvent).where(JobEvent.job_id == held)).all()) == 1
        session.get(Tenant, "a" * 32).quotas = {"running_jobs": 2}
    assert _admit(db, settings, free=3) == [held]
    with db.session() as session:
        assert session.get(Job, held).hold_reason is None


def test_compute_quota_holds_a_tenant_for_the_rest_of_the_window(db, settings):
    with db.session() as session:
        session.get(Tenant, "a" * 32).quotas = {"compute_hours": 0.1}  # six minutes
        session.add(JobRun(job_id="x" * 32, tenant_id="a" * 32, worker="w",
                           started_at=T0, ended_at=T0 + timedelta(minutes=7)))
    held = _job(db, "a", 0)
    assert _admit(db, settings, free=1) == []
    with db.session() as session:
        assert "quota compute_hours" in session.get(Job, held).hold_reason


def test_a_job_waiting_to_retry_is_not_admitted_before_its_time(db, settings):
    later = _job(db, "a", 0, retry_at=utcnow() + timedelta(minutes=5))
    now = _job(db, "a", 1, retry_at=utcnow() - timedelta(seconds=1))
    assert _admit(db, settings, free=2) == [now]
    with db.session() as session:
        assert session.get(Job, later).status == "queued"


def _hold(db, job_id: str) -> str | None:
    with db.session() as session:
        return session.get(Job, job_id).hold_reason


def test_a_job_goes_to_the_smallest_worker_that_fits(db, settings):
    one = _job(db, "a", 0)
    two = _job(db, "b", 1, spec={"devices": 2})
    eight = LiveWorker("big@host", 8)
    # The one-device job leaves the eight-GPU worker to the job that needs it.
    assert _admit(db, settings, workers=[eight, LiveWorker("small@host", 1)]) == [one, two]
    four = _job(db, "c", 2, spec={"devices": 4})
    auto = _job(db, "c", 3, spec={"devices": "auto"})
    with db.session() as session:  # both earlier jobs run, on the workers they were meant for
        session.get(Job, one).status = JobStatus.RUNNING
        session.get(Job, one).worker = "small@host:123"
        session.get(Job, two).status = JobStatus.RUNNING
        session.get(Job, two).worker = "big@host:456"
    assert _admit(db, settings, workers=[eight, LiveWorker("small@host", 1)]) == []
    # A worker with two devices comes: too small for four, right for the auto job.
    assert _admit(db, settings, workers=[eight, LiveWorker("small@host", 1),
                                         LiveWorker("mid@host", 2)]) == [auto]
    assert _hold(db, four) is None  # enough devices live, only busy: it waits, no reason


def test_a_job_no_live_worker_could_run_is_held_saying_why(db, settings):
    two = _job(db, "a", 0, spec={"devices": 2})
    one = _job(db, "a", 1)
    small = [LiveWorker("w1@host", 1), LiveWorker("w2@host", 1)]
    assert _admit(db, settings, workers=small) == [one]  # the later job is not stuck behind it
    assert _hold(db, two) == "waiting for a worker with 2 devices (live workers have at most 1)"
    _admit(db, settings, workers=small)  # the same reason: one note only
    with db.session() as session:
        notes = session.scalars(select(JobEvent).where(JobEvent.job_id == two)).all()
        assert [n.data["message"] for n in notes] == [
            "held back: waiting for a worker with 2 devices (live workers have at most 1)"]
    assert _admit(db, settings, workers=[]) == []
    assert _hold(db, two) == "waiting for a worker with 2 devices (no worker is live)"
    assert _admit(db, settings, workers=[*small, LiveWorker("w3@host", 2)]) == [two]
    assert _hold(db, two) is None


def test_a_quota_reason_wins_over_the_devices_one(db, settings):
    with db.session() as session:
        session.get(Tenant, "a" * 32).quotas = {"running_jobs": 1}
    _job(db, "a", 0, JobStatus.RUNNING)
    held = _job(db, "a", 1, spec={"devices": 4})
    assert _admit(db, settings, free=2) == []
    assert _hold(db, held).startswith("quota running_jobs: 1 of 1")


def test_admitted_jobs_hold_the_workers_they_fit_best(db, settings):
    _job(db, "a", 0, JobStatus.ADMITTED, spec={"devices": 2})  # about to take the 2-GPU one
    _job(db, "a", 1, JobStatus.ADMITTED)  # about to take the 1-GPU one
    later = [_job(db, "b", 2), _job(db, "b", 3, spec={"devices": 2})]
    workers = [LiveWorker("w1@host", 1), LiveWorker("w2@host", 2), LiveWorker("w4@host", 4)]
    assert _admit(db, settings, workers=workers) == [later[0]]  # only the 4-GPU one is free
    assert _admit(db, settings, workers=[*workers, LiveWorker("w2b@host", 2)]) == [later[1]]


@pytest.fixture
def broker(redis_url, tmp_path):
    """A Redis database of its own on the suite's Redis: no running worker consumes what is
    enqueued here, and no real worker's key is live in it."""
    import redis as redis_lib

    url = redis_url.rsplit("/", 1)[0] + "/10"
    client = redis_lib.Redis.from_url(url)
    client.flushdb()
    yield client, Settings(home=tmp_path, redis_url=url, worker_heartbeat_s=1)
    client.flushdb()


def _queues(client) -> dict[str, set[str]]:
    """The job ids waiting in each queue (priority lists folded into their queue)."""
    from ftune.service.lifecycle.reconciler import _message_id

    found: dict[str, set[str]] = {}
    for key in client.scan_iter(match="training*"):
        if client.type(key) == b"list":
            queue = key.decode().split(":")[0]
            found.setdefault(queue, set()).update(
                _message_id(raw) for raw in client.lrange(key, 0, -1))
    return found


def test_a_two_device_job_waits_for_a_two_device_worker_then_goes_to_its_queue(db, broker):
    from ftune.service.lifecycle.dispatcher import dispatch
    from ftune.service.lifecycle.liveness import live_workers
    from ftune.service.queue import make_celery
    from ftune.workers.heartbeat import Heartbeat
    from ftune.workers.placement import WorkerDevices

    client, settings = broker
    celery = make_celery(settings)
    job_id = _job(db, "a", 0, spec={"devices": 2})
    small = Heartbeat(settings.broker_url, "small@host", 1.0, WorkerDevices("cuda", (0,)))
    big = Heartbeat(settings.broker_url, "big@host", 1.0, WorkerDevices("cuda", (2, 3)))
    small.start()
    try:
        assert dispatch(db, celery, client, settings) == []
        assert _hold(db, job_id) == ("waiting for a worker with 2 devices (live workers have "
                                     "at most 1)")
        big.start()
        assert sorted(live_workers(client)) == [LiveWorker("big@host", 2),
                                                LiveWorker("small@host", 1)]
        assert dispatch(db, celery, client, settings) == [job_id]
        assert _queues(client) == {"training.d2": {job_id}}
        with db.session() as session:
            job = session.get(Job, job_id)
            assert job.status == "admitted" and job.hold_reason is None
    finally:
        small.stop()
        big.stop()


def test_an_older_worker_without_devices_in_its_beat_counts_as_one(broker):
    from ftune.service.lifecycle.liveness import live_workers, worker_key

    client, _ = broker
    client.set(worker_key("old@host"), json.dumps({"at": 1.0}), ex=10)
    client.set(worker_key("odd@host"), b"not json", ex=10)
    assert sorted(live_workers(client)) == [LiveWorker("odd@host", 1), LiveWorker("old@host", 1)]


def test_the_reconciler_enqueues_a_lost_message_to_its_device_class(db, broker):
    from ftune.service.lifecycle.reconciler import reconcile
    from ftune.service.queue import make_celery

    client, settings = broker
    lost = [_job(db, "a", n, JobStatus.ADMITTED, spec=spec,
                 admitted_at=utcnow() - timedelta(seconds=15))
            for n, spec in enumerate([{"devices": 4}, {"devices": "auto"}])]
    repairs = reconcile(db, make_celery(settings), client, settings)
    assert sorted(repairs.reenqueued) == sorted(lost)
    assert _queues(client) == {"training.d4": {lost[0]}, "training": {lost[1]}}
