"""The dispatcher's choices on real databases (SQLite and PostgreSQL): fair share across
tenants, priority within one, run-time quotas that hold jobs back, retry times."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from ftune.service.db import migrate
from ftune.service.db.session import Database
from ftune.service.db.tables import Job, JobEvent, JobRun, Tenant, utcnow
from ftune.service.job_status import JobStatus
from ftune.service.lifecycle.dispatcher import admit
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
        job = Job(tenant_id=tenant * 32, dataset_id="d" * 32, spec={}, epochs=1,
                  status=status, created_at=T0 + timedelta(seconds=n), **values)
        session.add(job)
        session.flush()
        return job.id


def _admit(db, settings, free: int) -> list[str]:
    with db.session() as session:
        return [job_id for job_id, _ in admit(session, settings, free_workers=free)]


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
