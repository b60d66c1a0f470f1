"""Looking at what the local blob store holds (a data directory's ``blobs/``), for tests."""

from __future__ import annotations

import tarfile
from pathlib import Path

from ftune.service.blobs.keys import dataset_key, model_key


def local_blob(home: Path, key: str) -> Path:
    """Where the embedded store keeps ``key`` under the data directory ``home``."""
    return home / "blobs" / key


def stored_dataset(home: Path, dataset_id: str) -> Path:
    return local_blob(home, dataset_key(dataset_id))


def stored_model(home: Path, model_id: str) -> Path:
    return local_blob(home, model_key(model_id))


def tar_names(archive: Path) -> list[str]:
    """The files a stored tar holds."""
    with tarfile.open(archive) as tar:
        return sorted(m.name for m in tar.getmembers() if m.isfile())
