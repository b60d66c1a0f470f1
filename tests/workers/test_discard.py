"""A bundle stored for a model the worker then could not record is removed at once, even
when recording failed because the database is down (found by the soak: PostgreSQL restarting
at that moment left bundles with no row and nothing scheduled)."""

from __future__ import annotations

import pytest

from ftune.service.blobs.base import BlobMissing
from ftune.service.blobs.keys import model_key
from ftune.service.db.session import Database
from ftune.service.storage import Storage
from ftune.workers.runner import JobRunner, RunLimits, RunTimings

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
