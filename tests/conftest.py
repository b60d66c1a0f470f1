"""Shared fixtures: small real datasets built once per session."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Tests run offline the way users do: ftune.models makes the hub offline by itself (see
# tests/models/test_settings.py), so nothing here sets HF_HUB_OFFLINE.
os.environ.pop("FTUNE_WEIGHTS_DIR", None)
# The suite writes little; it must pass on a machine with a nearly full disk too (the disk
# reserve has tests of its own).
os.environ["FTUNE_MIN_FREE_DISK_MB"] = "64"


@pytest.fixture
def engine_config() -> Iterator[Callable[..., object]]:
    """Give a test engine settings of its own: ``engine_config(weights_dir=...)``."""
    from ftune.models import settings as engine

    previous = engine.engine_settings()

    def use(**values: object) -> object:
        configured = engine.load_settings(engine.EngineSettings, **values)
        engine.configure(configured)
        return configured

    yield use
    engine.configure(previous)


_SESSION_TEMPDIR = tempfile.tempdir  # before any app was made in this process


@pytest.fixture(autouse=True)
def _restore_tempdir() -> Iterator[None]:
    """An app made in-process points tempfile at its data directory (as the API process
    should); later tests must not inherit that. Put back what the session started with, not
    what the test found: a module-scoped app is made before this fixture runs, and a
    PostgreSQL cluster made in its private folder cannot be read by the postgres user."""
    yield
    tempfile.tempdir = _SESSION_TEMPDIR


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def animal_arrays():
    from ftune.testing.realdata import animal_mnist_arrays

    return animal_mnist_arrays()


@pytest.fixture(scope="session")
def animal_folder(tmp_path_factory, animal_arrays) -> Path:
    """40 real silhouettes per class, 10 classes: DATA/<class>/<images>."""
    from ftune.testing.realdata import balanced_indices, write_image_folder

    images, labels = animal_arrays
    idx = balanced_indices(labels, 40)
    return write_image_folder(tmp_path_factory.mktemp("animals") / "data", images[idx], labels[idx])


@pytest.fixture(scope="session")
def animal_heldout(animal_arrays):
    """Images held out of ``animal_folder`` (never used for training), 10 per class."""
    from ftune.testing.realdata import ANIMAL_CLASSES, balanced_indices

    images, labels = animal_arrays
    idx = balanced_indices(labels, 10, offset=40)
    return images[idx], [ANIMAL_CLASSES[int(label)] for label in labels[idx]]


@pytest.fixture(scope="session")
def multilabel_folder(tmp_path_factory) -> Path:
    """Multi-label: 2×2 mosaics of real silhouettes (animal0, animal1) and digits (digit2),
    labels.csv with each mosaic's label set; 90 train and 30 test, tiles from disjoint pools."""
    from ftune.testing.mosaics import only, tile_pools, write_mosaics

    pools = only(tile_pools(), [0, 1, 12])
    root = tmp_path_factory.mktemp("mosaics") / "data"
    return write_mosaics(root, {"train": 90, "test": 30}, seed=1, pools=pools)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, animal_arrays) -> Path:
    """3 classes × 12 images, for tests that only need the loop to run."""
    from ftune.testing.realdata import balanced_indices, write_image_folder

    images, labels = animal_arrays
    idx = balanced_indices(labels, 12, classes=3)
    return write_image_folder(tmp_path_factory.mktemp("tiny") / "data", images[idx], labels[idx])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """FTUNE_TEST_PG_URL when given, else a private PostgreSQL cluster for the session."""
    from ftune.testing.postgres import PrivateCluster

    if os.environ.get("FTUNE_TEST_PG_URL"):
        yield os.environ["FTUNE_TEST_PG_URL"]
        return
    with PrivateCluster() as cluster:
        yield cluster.url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> Iterator[str]:
    """An empty database, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ftune.db'}"
        return
    from ftune.testing.postgres import fresh_database

    with fresh_database(request.getfixturevalue("postgres_server")) as url:
        yield url


# Fixtures that start servers or ftune processes: a test using one is marked `processes`,
# so `make test-fast` (-m "not processes") runs only what needs no process of its own.
_PROCESS_FIXTURES = frozenset({"stack", "client", "api_url", "worker", "redis_url", "tiny_model",
                               "tiny_dataset", "postgres_server", "pg_client", "client_b",
                               "member_client", "operator_client", "access", "fuzz_target",
                               "up"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (_PROCESS_FIXTURES & set(getattr(item, "fixturenames", ()))
                or params.get("database_url") == "postgresql"):
            item.add_marker(pytest.mark.processes)
