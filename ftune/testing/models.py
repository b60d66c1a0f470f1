"""A tuned model registered in a data directory without a worker: trained in this process on
real images and recorded as a succeeded job's model, for benches of the predict side."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from ftune.models.bundle import save_bundle
from ftune.models.training.fit import FitResult, fit
from ftune.service.blobs.base import BlobInfo
from ftune.service.blobs.keys import dataset_key, model_key
from ftune.service.db import migrate
from ftune.service.db.session import Database
from ftune.service.db.tables import DEFAULT_TENANT_ID, Dataset, Job, TunedModel
from ftune.service.storage import Storage
from ftune.testing.realdata import animal_mnist_arrays, balanced_indices, write_image_folder


def store_bundle(storage: Storage, result: FitResult, model_id: str) -> BlobInfo:
    """The model's bundle in ``storage``'s blob store, as a worker stores it."""
    with tempfile.TemporaryDirectory(dir=storage.tmp) as scratch:
        save_bundle(result, Path(scratch) / "bundle")
        return storage.put_tree(model_key(model_id), Path(scratch) / "bundle")


@dataclass(frozen=True)
class TinyModel:
    images: Path  # the folder it was trained on
    bundle: Path  # its bundle, as the API fetches it from the store


def register_tiny_model(work: Path, home: Path, model_id: str,
                        image_size: int | None = None) -> TinyModel:
    """Train one epoch on 3 classes × 12 images, store it under ``home`` as ``model_id`` (in
    the default tenant, the local blob store)."""
    images, labels = animal_mnist_arrays()
    idx = balanced_indices(labels, 12, classes=3)
    folder = write_image_folder(work / "data", images[idx], labels[idx])
    return register_model(folder, home, model_id, {"image_size": image_size, "epochs": 1})


def register_model(folder: Path, home: Path, model_id: str, spec: dict, *,
                   with_dataset: bool = False) -> TinyModel:
    """Train ``spec`` on ``folder`` in this process and record it under ``home`` as
    ``model_id``; ``with_dataset``: its dataset stored and recorded too (under the same id),
    as an upload leaves it, so the serving preparation can check the model on its images."""
    result = fit(folder, spec)
    storage = Storage(home)
    storage.prepare()
    stored = store_bundle(storage, result, model_id)
    db = Database(f"sqlite:///{storage.home / 'ftune.db'}", prepare=migrate.upgrade)
    with db.session() as session:
        if with_dataset:
            images = storage.put_tree(dataset_key(model_id), folder)
            session.add(Dataset(id=model_id, tenant_id=DEFAULT_TENANT_ID, name="bench",
                                classes=result.classes, class_counts={}, splits={},
                                num_images=result.num_train + result.num_val, warnings=[],
                                size_bytes=images.size, blob_sha256=images.sha256))
        session.add(Job(id=model_id, tenant_id=DEFAULT_TENANT_ID, dataset_id=model_id, spec={},
                        epochs=1, status="succeeded"))
        session.flush()
        session.add(TunedModel(id=model_id, tenant_id=DEFAULT_TENANT_ID, job_id=model_id,
                               dataset_id=model_id, name="bench", backbone=result.backbone,
                               classes=result.classes, metrics={},
                               blob_sha256=stored.sha256, size_bytes=stored.size,
                               spec=result.spec.model_dump(mode="json")))
    db.dispose()
    return TinyModel(folder, storage.local_tree(model_key(model_id), str(stored.sha256)))
