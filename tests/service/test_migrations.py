"""Schema migrations, on SQLite and on PostgreSQL: a database full of rows from an older
release upgrades with every row intact, two processes upgrading at once don't race, and
workers refuse a schema their release does not know."""

from __future__ import annotations

import os
import subprocess
from datetime import datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, insert, select, text

from ftune.processes import ftune_command
from ftune.service.db import migrate
from ftune.service.db.session import make_engine
from ftune.service.db.tables import DEFAULT_TENANT_ID, DEFAULT_TENANT_NAME, Base

pytestmark = pytest.mark.processes

T0 = datetime(2026, 1, 2, 3, 4, 5)
ID = {name: name[0] * 32 for name in ("dataset", "job", "model")}

# One row in every table of the baseline (revision 0001), written with that schema's columns.
BASELINE_ROWS = {
    "datasets": [{"id": ID["dataset"], "name": "flowers", "created_at": T0,
                  "classes": ["a", "b"], "class_counts": {"train": {"a": 2, "b": 3}},
                  "num_images": 5, "splits": {"train": 5, "val": None},
                  "warnings": ["w"], "size_bytes": 1234, "content_hash": "h" * 64,
                  "report": {"ok": True}}],
    "jobs": [{"id": ID["job"], "dataset_id": ID["dataset"], "status": "succeeded",
              "spec": {"epochs": 2}, "created_at": T0, "started_at": T0, "finished_at": T0,
              "epoch": 2, "epochs": 2, "step": 0, "steps": 4, "best": {"epoch": 2},
              "stopped_early": False, "error": None, "model_id": ID["model"],
              "cancel_requested": False, "attempts": 1, "worker": "w1", "heartbeat_at": T0,
              "priority": 7, "max_runtime_s": 600, "model_name": "flowers"}],
    "job_events": [{"job_id": ID["job"], "kind": "status", "data": {"status": "queued"},
                    "created_at": T0}],
    "idempotency_keys": [{"key": "k-1", "body_sha256": "b" * 64, "job_id": ID["job"],
                          "created_at": T0}],
    "epoch_metrics": [{"job_id": ID["job"], "epoch": e, "row": {"epoch": e, "loss": 1 / e},
                       "created_at": T0} for e in (1, 2)],
    "models": [{"id": ID["model"], "name": "flowers", "version": 1, "job_id": ID["job"],
                "dataset_id": ID["dataset"], "dataset_hash": "h" * 64, "backbone": "x",
                "classes": ["a", "b"], "metrics": {"best_epoch": 2}, "spec": {"epochs": 2},
                "created_at": T0}],
    "model_aliases": [{"name": "flowers", "alias": "production", "model_id": ID["model"],
                       "updated_at": T0}],
}
# Columns a later revision renamed: (table, baseline name) -> name at head.
RENAMED = {("idempotency_keys", "job_id"): "object_id"}


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _fill(engine) -> None:
    tables = MetaData()
    tables.reflect(engine)
    with engine.begin() as connection:
        for name, rows in BASELINE_ROWS.items():
            connection.execute(insert(tables.tables[name]), rows)


def _assert_rows_intact(engine) -> None:
    tables = MetaData()
    tables.reflect(engine)
    with engine.connect() as connection:
        for name, rows in BASELINE_ROWS.items():
            table = tables.tables[name]
            stored = [dict(r._mapping) for r in connection.execute(select(table))]
            assert len(stored) == len(rows), name
            for row in rows:
                expected = {RENAMED.get((name, k), k): v for k, v in row.items()}
                match = [s for s in stored if all(s[k] == v for k, v in expected.items())]
                assert match, f"{name}: row {expected} changed or lost; stored: {stored}"


def test_the_migrations_build_exactly_the_tables_the_code_expects(engine):
    migrate.upgrade(engine)
    with engine.connect() as connection:
        diffs = compare_metadata(MigrationContext.configure(
            connection, opts={"compare_type": True}), Base.metadata)
    assert diffs == [], f"tables.py and the migrations disagree; add a revision: {diffs}"


def test_a_database_full_of_rows_upgrades_with_every_row_intact(engine):
    migrate.upgrade(engine, migrate.BASELINE)
    _fill(engine)
    before, after = migrate.upgrade(engine)
    assert (before, after) == (migrate.BASELINE, migrate.head_revision())
    _assert_rows_intact(engine)
    migrate.require_current(engine)
    with engine.connect() as connection:  # what existed before tenancy is the default tenant's
        for table in ("datasets", "jobs", "models", "model_aliases", "idempotency_keys"):
            owners = connection.execute(text(f"SELECT DISTINCT tenant_id FROM {table}")).all()
            assert owners == [(DEFAULT_TENANT_ID,)], table
        names = connection.execute(text("SELECT name FROM tenants WHERE id = :id"),
                                   {"id": DEFAULT_TENANT_ID}).all()
        assert names == [(DEFAULT_TENANT_NAME,)]


def test_a_database_made_before_migrations_is_stamped_then_upgraded(engine):
    # What the releases before migrations left: create_all's tables, no alembic_version.
    migrate.upgrade(engine, migrate.BASELINE)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))
    _fill(engine)
    assert migrate.current_revision(engine) is None
    migrate.upgrade(engine)
    assert migrate.current_revision(engine) == migrate.head_revision()
    _assert_rows_intact(engine)


def test_downgrade_and_upgrade_again(engine):
    migrate.upgrade(engine)
    migrate.downgrade(engine, "base")
    assert migrate.current_revision(engine) is None
    migrate.upgrade(engine)
    migrate.require_current(engine)


def _env(database_url: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": database_url}


def test_processes_upgrading_together_do_not_race(database_url, tmp_path):
    env = _env(database_url)
    runs = [subprocess.Popen(ftune_command("db", "upgrade", "--home", str(tmp_path)),
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for _ in range(3)]
    outputs = [(p.wait(120), p.stdout.read().decode()) for p in runs]
    assert all(code == 0 for code, _ in outputs), outputs
    current = subprocess.run(ftune_command("db", "current", "--home", str(tmp_path)), env=env,
                             capture_output=True, text=True, timeout=120)
    assert current.returncode == 0 and "(current)" in current.stdout


def test_workers_and_serve_refuse_a_schema_that_is_not_current(database_url, engine, tmp_path):
    env = {**_env(database_url), "REDIS_URL": "redis://127.0.0.1:1/0"}
    for command in (("worker",), ("serve", "--port", "1")):
        result = subprocess.run(ftune_command(*command, "--home", str(tmp_path)), env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert "ftune db upgrade" in result.stderr and "Traceback" not in result.stderr
    migrate.upgrade(engine)
    with engine.begin() as connection:  # as if a newer release had upgraded it
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    result = subprocess.run(ftune_command("worker", "--home", str(tmp_path)), env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "does not know" in result.stderr


def test_existing_events_and_audit_rows_are_numbered_within_their_job_and_tenant(engine):
    """0008: ids shown to clients count within a job (events) or a tenant (audit rows); rows
    from before are numbered in the order they were written, interleaved as they were."""
    migrate.upgrade(engine, "0007")
    jobs, tenants = ["a" * 32, "b" * 32], ["t" * 32, "u" * 32, None]
    with engine.begin() as connection:
        for i in range(7):
            connection.execute(text("INSERT INTO job_events (job_id, kind, data, created_at) "
                                    "VALUES (:job, 'note', '{}', :at)"),
                               {"job": jobs[i % 2], "at": T0})
            connection.execute(text("INSERT INTO audit_log (tenant_id, action, status_code, "
                                    "created_at) VALUES (:tenant, 'POST /v1/jobs', 201, :at)"),
                               {"tenant": tenants[i % 3], "at": T0})
    migrate.upgrade(engine)
    with engine.connect() as connection:
        events = connection.execute(text("SELECT job_id, seq FROM job_events ORDER BY id")).all()
        audit = connection.execute(text("SELECT tenant_id, seq FROM audit_log ORDER BY id")).all()
    assert [seq for job, seq in events if job == jobs[0]] == [1, 2, 3, 4]
    assert [seq for job, seq in events if job == jobs[1]] == [1, 2, 3]
    for tenant, count in zip(tenants, (3, 2, 2), strict=True):
        assert [seq for owner, seq in audit if owner == tenant] == list(range(1, count + 1))
