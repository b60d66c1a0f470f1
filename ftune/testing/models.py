"""A tuned model registered in a data directory without a worker: trained in this process on
real images and recorded as a succeeded job's model, for benches of the predict side."""

from __future__ import annotations

from pathlib import Path

from ftune.models.bundle import save_bundle
from ftune.models.training.fit import fit
from ftune.service.db import migrate
from ftune.service.db.session import Database
from ftune.service.db.tables import DEFAULT_TENANT_ID, Job, TunedModel
from ftune.service.storage import Storage
from ftune.testing.realdata import animal_mnist_arrays, balanced_indices, write_image_folder


def register_tiny_model(work: Path, home: Path, model_id: str,
                        image_size: int | None = None) -> Path:
    """Train one epoch on 3 classes × 12 images, store it under ``home`` as ``model_id`` (in
    the default tenant); returns the folder of training images."""
    images, labels = animal_mnist_arrays()
    idx = balanced_indices(labels, 12, classes=3)
    folder = write_image_folder(work / "data", images[idx], labels[idx])
    result = fit(folder, {"image_size": image_size, "epochs": 1})
    storage = Storage(home)
    storage.prepare()
    save_bundle(result, storage.model_dir(model_id))
    db = Database(f"sqlite:///{storage.home / 'ftune.db'}", prepare=migrate.upgrade)
    with db.session() as session:
        session.add(Job(id=model_id, tenant_id=DEFAULT_TENANT_ID, dataset_id=model_id, spec={},
                        epochs=1, status="succeeded"))
        session.flush()
        session.add(TunedModel(id=model_id, tenant_id=DEFAULT_TENANT_ID, job_id=model_id,
                               dataset_id=model_id, name="bench", backbone=result.backbone,
                               classes=result.classes, metrics={},
                               spec=result.spec.model_dump(mode="json")))
    db.dispose()
    return folder
