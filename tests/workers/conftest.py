"""A worker's database for the worker tests: SQLite at the current schema, one dataset."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ftune.service.db import migrate
from ftune.service.db.session import Database
from ftune.service.db.tables import DEFAULT_TENANT_ID, Dataset

DATASET_ID = "d" * 32


@pytest.fixture
def database(tmp_path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'ftune.db'}", prepare=migrate.upgrade)
    with db.session() as session:
        session.add(Dataset(id=DATASET_ID, tenant_id=DEFAULT_TENANT_ID, name="d",
                            classes=["a", "b"], class_counts={}, num_images=2, splits={},
                            warnings=[]))
    yield db
    db.dispose()
