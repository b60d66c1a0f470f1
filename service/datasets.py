"""Dataset service functions: turn an uploaded archive into a checked, stored dataset."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import Counter
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.data.archives import ArchiveLimits, unpack
from models.data.discover import ImageFolderIndex, scan_image_folder
from models.errors import DatasetError
from service.db.tables import Dataset, Job, JobStatus
from service.errors import Conflict, InvalidInput, NotFound
from service.ids import is_id, new_id
from service.storage import Storage

log = logging.getLogger(__name__)

MAX_NAME = 200
IMBALANCE_WARNING = 10.0  # largest class / smallest class


def clean_name(name: str | None, filename: str | None) -> str:
    """The name the user gave, else the archive's file name without its suffixes."""
    if name is not None:
        name = name.strip()
        if not name or len(name) > MAX_NAME or any(ord(c) < 32 for c in name):
            raise InvalidInput(f"name must be 1 to {MAX_NAME} printable characters")
        return name
    stem = re.sub(r"(\.tar)?\.(zip|tgz|gz|tar)$", "", Path(filename or "").name, flags=re.I)
    stem = "".join(c for c in stem if ord(c) >= 32).strip()[:MAX_NAME]
    return stem or "dataset"


def _counts(index: ImageFolderIndex) -> dict[str, dict[str, int]]:
    counts = {"train": dict(Counter(index.classes[s.label] for s in index.train))}
    if index.val is not None:
        val = Counter(index.classes[s.label] for s in index.val)
        counts["val"] = {c: val.get(c, 0) for c in index.classes}
    return counts


def _warnings(index: ImageFolderIndex, counts: dict[str, dict[str, int]]) -> list[str]:
    warnings = []
    if index.skipped:
        examples = "; ".join(f"{path}: {reason}" for path, reason in index.skipped[:5])
        warnings.append(f"{len(index.skipped)} file(s) skipped (not images or not decodable), "
                        f"e.g. {examples}. Remove or fix them if they should be used.")
    train = counts["train"]
    largest, smallest = max(train.values()), min(train.values())
    if smallest and largest / smallest >= IMBALANCE_WARNING:
        warnings.append(f"classes are imbalanced: {largest} vs {smallest} training images "
                        f"({largest / smallest:.0f}:1); collect more of the small classes.")
    if "val" in counts:
        empty = [c for c, n in counts["val"].items() if n == 0]
        if empty:
            warnings.append(f"val/ has no images of {empty}; their validation metrics will be "
                            "missing.")
    return warnings


def _folder_size(folder: Path) -> int:
    return sum(entry.stat().st_size for entry in folder.rglob("*") if entry.is_file())


def ingest_archive(session: Session, storage: Storage, *, archive: Path, filename: str | None,
                   name: str | None, limits: ArchiveLimits) -> Dataset:
    """Unpack, scan and record a dataset. A rejected archive leaves nothing behind."""
    dataset_name = clean_name(name, filename)
    dataset_id = new_id()
    staging = storage.datasets / f".{dataset_id}.staging"
    try:
        unpack(archive, staging, limits)
        try:
            index = scan_image_folder(staging)
        except DatasetError as exc:
            raise InvalidInput(str(exc).replace(str(staging), "the archive")) from exc
        counts = _counts(index)
        dataset = Dataset(
            id=dataset_id, name=dataset_name, classes=index.classes, class_counts=counts,
            num_images=len(index.train) + len(index.val or []),
            splits={"train": len(index.train),
                    "val": None if index.val is None else len(index.val)},
            warnings=_warnings(index, counts), size_bytes=_folder_size(staging))
        os.rename(staging, storage.dataset_dir(dataset_id))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        session.add(dataset)
        session.commit()  # here, so a failed commit also removes the files
    except BaseException:
        shutil.rmtree(storage.dataset_dir(dataset_id), ignore_errors=True)
        raise
    return dataset


def get_dataset(session: Session, dataset_id: str) -> Dataset:
    dataset = session.get(Dataset, dataset_id) if is_id(dataset_id) else None
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} not found")
    return dataset


def list_datasets(session: Session) -> list[Dataset]:
    return list(session.scalars(select(Dataset).order_by(Dataset.created_at.desc())))


def delete_dataset(session: Session, *, dataset_id: str) -> None:
    """Delete the row; call ``discard_dataset_files`` once the transaction has committed."""
    dataset = get_dataset(session, dataset_id)
    active = session.scalar(select(func.count()).select_from(Job).where(
        Job.dataset_id == dataset_id, Job.status.in_(JobStatus.ACTIVE)))
    if active:
        raise Conflict(f"dataset {dataset_id} is used by {active} queued or running job(s); "
                       "cancel them or wait for them to finish")
    session.delete(dataset)
    session.flush()


def discard_dataset_files(storage: Storage, dataset_id: str) -> None:
    # Rename first so the delete is atomic from a reader's view, then remove the files.
    folder = storage.dataset_dir(dataset_id)
    if folder.exists():
        trash = storage.tmp / f"deleted-{dataset_id}"
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)


def dataset_view(dataset: Dataset) -> dict:
    return {
        "id": dataset.id, "name": dataset.name, "created_at": dataset.created_at,
        "classes": dataset.classes, "num_images": dataset.num_images, "splits": dataset.splits,
        "class_counts": dataset.class_counts, "warnings": dataset.warnings,
        "size_bytes": dataset.size_bytes,
    }
