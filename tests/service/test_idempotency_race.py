"""Concurrent submissions with one Idempotency-Key make one job, on SQLite and PostgreSQL."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import redis

from ftune.service.auth.principal import Principal, Role
from ftune.service.db import migrate
from ftune.service.db.session import Database
from ftune.service.db.tables import DEFAULT_TENANT_ID, Dataset, IdempotencyKey, Job
from ftune.service.jobs import submit_job
from ftune.service.lifecycle.dispatcher import dispatch
from ftune.service.queue import make_celery
from ftune.service.schemas import JobIn
from ftune.service.settings import Settings


def test_one_key_racing_from_many_threads_makes_one_job(database_url, redis_url, tmp_path):
    # A Redis database of its own: no running worker consumes what is enqueued here.
    broker = redis_url.rsplit("/", 1)[0] + "/9"
    settings = Settings(home=tmp_path, redis_url=broker)
    celery, client = make_celery(settings), redis.Redis.from_url(broker)
    db = Database(database_url, prepare=migrate.upgrade)
    with db.session() as session:
        session.add(Dataset(id="d" * 32, tenant_id=DEFAULT_TENANT_ID, name="d",
                            classes=["a", "b"], class_counts={}, num_images=2, splits={},
                            warnings=[]))
    request = JobIn(dataset_id="d" * 32, spec={"epochs": 1})
    who = Principal(Role.MEMBER, DEFAULT_TENANT_ID, "k" * 32)

    def submit(_: int) -> str:
        return submit_job(db, who, settings, request=request, idempotency_key="same-key",
                          dispatch=lambda: dispatch(db, celery, client, settings))

    try:
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(submit, range(8)))
        assert len(set(ids)) == 1
        with db.session() as session:
            assert session.query(Job).count() == 1
            key = session.get(IdempotencyKey, (DEFAULT_TENANT_ID, "same-key"))
            assert key.job_id == ids[0]
    finally:
        client.flushdb()
        db.dispose()
