"""Concurrent submissions with one Idempotency-Key make one object, on SQLite and
PostgreSQL: jobs and sweeps share the helper (service/idempotency.py), the race included."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from ftune.service.auth.principal import Principal, Role
from ftune.service.db import migrate
from ftune.service.db.session import Database
from ftune.service.db.tables import DEFAULT_TENANT_ID, Dataset, IdempotencyKey, Job, Sweep
from ftune.service.jobs import submit_job
from ftune.service.lifecycle.dispatcher import dispatch
from ftune.service.queue import make_celery
from ftune.service.schemas import JobIn, SweepIn
from ftune.service.settings import Settings
from ftune.service.sweeps.sweeps import submit_sweep

WHO = Principal(Role.MEMBER, DEFAULT_TENANT_ID, "k" * 32)


@pytest.fixture
def db(database_url):
    db = Database(database_url, prepare=migrate.upgrade)
    with db.session() as session:
        session.add(Dataset(id="d" * 32, tenant_id=DEFAULT_TENANT_ID, name="d",
                            classes=["a", "b"], class_counts={}, num_images=2, splits={},
                            warnings=[]))
    yield db
    db.dispose()


def _race(submit: Callable[[int], str]) -> str:
    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(submit, range(8)))
    assert len(ids) == 1
    return ids.pop()


def test_one_key_racing_from_many_threads_makes_one_job(db, redis_url, tmp_path):
    # A Redis database of its own: no running worker consumes what is enqueued here.
    broker = redis_url.rsplit("/", 1)[0] + "/9"
    settings = Settings(home=tmp_path, redis_url=broker)
    celery, client = make_celery(settings), redis.Redis.from_url(broker)
    request = JobIn(dataset_id="d" * 32, spec={"epochs": 1})

    def submit(_: int) -> str:
        return submit_job(db, WHO, settings, request=request, idempotency_key="same-key",
                          dispatch=lambda: dispatch(db, celery, client, settings))

    try:
        job_id = _race(submit)
        with db.session() as session:
            assert session.query(Job).count() == 1
            key = session.get(IdempotencyKey, (DEFAULT_TENANT_ID, "same-key"))
            assert key is not None and key.object_id == job_id
    finally:
        client.flushdb()


def test_one_key_racing_from_many_threads_makes_one_sweep(db, tmp_path):
    settings = Settings(home=tmp_path)
    request = SweepIn(dataset_id="d" * 32, base={"epochs": 1}, n_trials=2,
                      space={"head.dropout": {"uniform": [0, 0.5]}})

    def submit(_: int) -> str:
        return submit_sweep(db, WHO, settings, request=request, idempotency_key="same-key",
                            dispatch=lambda: None)

    sweep_id = _race(submit)
    with db.session() as session:
        assert session.query(Sweep).count() == 1
        # Under the sweeps' prefix: the same key may still make a job.
        assert session.get(IdempotencyKey, (DEFAULT_TENANT_ID, "same-key")) is None
        key = session.get(IdempotencyKey, (DEFAULT_TENANT_ID, "sweep:same-key"))
        assert key is not None and key.object_id == sweep_id
