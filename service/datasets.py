"""Dataset service functions: turn an uploaded archive into a checked, stored dataset."""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ftune.models.data.archives import ArchiveLimits, unpack
from ftune.models.data.discover import inspect_dataset
from ftune.models.data.lint import LintReport
from ftune.models.errors import ArchiveTooLarge
from ftune.models.settings import EngineSettings
from ftune.service.auth.principal import Principal
from ftune.service.db.tables import Dataset, Job
from ftune.service.errors import (
    Conflict,
    DatasetRejected,
    InvalidInput,
    NotFound,
    TooManyRequests,
)
from ftune.service.ids import is_id, new_id
from ftune.service.job_status import ACTIVE
from ftune.service.storage import Storage

log = logging.getLogger(__name__)

MAX_NAME = 200


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


def _folder_size(folder: Path) -> int:
    return sum(entry.stat().st_size for entry in folder.rglob("*") if entry.is_file())


@dataclass(frozen=True)
class DatasetChecks:
    limits: ArchiveLimits
    min_per_class: int
    max_pixels: int

    @classmethod
    def from_settings(cls, engine: EngineSettings) -> DatasetChecks:
        return cls(limits=ArchiveLimits(max_bytes=int(engine.max_extracted_mb * 2**20),
                                        max_files=engine.max_archive_files),
                   min_per_class=engine.min_images_per_class,
                   max_pixels=engine.max_image_pixels)


def _find_same_content(session: Session, tenant_id: str,
                       content_hash: str | None) -> Dataset | None:
    """The tenant's own copy of this content: another tenant's is never revealed."""
    if content_hash is None:
        return None
    return session.scalar(select(Dataset).where(Dataset.tenant_id == tenant_id,
                                                Dataset.content_hash == content_hash)
                          .order_by(Dataset.created_at).limit(1))


def _summary(report: LintReport) -> str:
    problems = "; ".join(f"{e.message}. {e.action}" for e in report.errors)
    return f"the dataset cannot be used: {problems}"


def ingest_archive(session: Session, storage: Storage, *, tenant_id: str, archive: Path,
                   filename: str | None, name: str | None, checks: DatasetChecks,
                   allowance: int | None = None, dedupe: bool = True) -> tuple[Dataset, bool]:
    """Unpack, check and record a dataset; returns it and whether it is new.

    ``allowance``: bytes the tenant's stored-bytes quota still allows. With ``dedupe``, the
    tenant's own copy of the same content is returned. A rejected archive leaves nothing
    behind; an existing dataset is never touched.
    """
    dataset_name = clean_name(name, filename)
    dataset_id = new_id()
    staging = storage.datasets / f".{dataset_id}.staging"
    try:
        _unpack_within(archive, staging, checks.limits, allowance)
        inspection = inspect_dataset(staging, min_per_class=checks.min_per_class,
                                     max_pixels=checks.max_pixels)
        report, index = inspection.report, inspection.index
        if not report.ok:
            raise DatasetRejected(_summary(report), report.to_dict())
        existing = (_find_same_content(session, tenant_id, index.content_hash) if dedupe
                    else None)
        if existing is not None:
            shutil.rmtree(staging, ignore_errors=True)
            return existing, False
        dataset = Dataset(
            id=dataset_id, tenant_id=tenant_id, name=dataset_name, classes=index.classes,
            class_counts=report.splits, num_images=report.num_images,
            # val null: no val split, one is held out at training time (spec.val_fraction).
            splits={"val": None, **{split: sum(counts.values())
                                    for split, counts in report.splits.items()}},
            warnings=[f"{w.message}. {w.action}" for w in report.warnings],
            size_bytes=_folder_size(staging), content_hash=index.content_hash,
            report=report.to_dict())
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
    return dataset, True


def _unpack_within(archive: Path, staging: Path, limits: ArchiveLimits,
                   allowance: int | None) -> None:
    """Unpack under the engine's limits and, when smaller, what the tenant's quota allows."""
    if allowance is None or allowance >= limits.max_bytes:
        unpack(archive, staging, limits)
        return
    try:
        unpack(archive, staging, replace(limits, max_bytes=allowance))
    except ArchiveTooLarge as exc:
        raise TooManyRequests(f"quota stored_gb exceeded: the archive unpacks to more than the "
                              f"{allowance} bytes left in the tenant's storage quota; free "
                              "some or ask an operator to raise it") from exc


def get_dataset(session: Session, principal: Principal, dataset_id: str) -> Dataset:
    """The dataset, if it exists and the principal may see it; another tenant's is a 404."""
    dataset = session.get(Dataset, dataset_id) if is_id(dataset_id) else None
    if dataset is None or not principal.can_see(dataset.tenant_id):
        raise NotFound(f"dataset {dataset_id} not found")
    return dataset


def list_datasets(session: Session, principal: Principal) -> list[Dataset]:
    query = select(Dataset).order_by(Dataset.created_at.desc())
    if not principal.is_operator:
        query = query.where(Dataset.tenant_id == principal.tenant_id)
    return list(session.scalars(query))


def delete_dataset(session: Session, principal: Principal, *, dataset_id: str) -> None:
    """Delete the row; call ``discard_dataset_files`` once the transaction has committed."""
    dataset = get_dataset(session, principal, dataset_id)
    active = session.scalar(select(func.count()).select_from(Job).where(
        Job.dataset_id == dataset_id, Job.status.in_(ACTIVE)))
    if active:
        raise Conflict(f"dataset {dataset_id} is used by {active} queued or running job(s); "
                       "cancel them or wait for them to finish")
    session.delete(dataset)
    session.flush()


def dataset_view(dataset: Dataset) -> dict:
    return {
        "id": dataset.id, "tenant_id": dataset.tenant_id, "name": dataset.name,
        "created_at": dataset.created_at,
        "classes": dataset.classes, "num_images": dataset.num_images, "splits": dataset.splits,
        "class_counts": dataset.class_counts, "warnings": dataset.warnings,
        "size_bytes": dataset.size_bytes, "content_hash": dataset.content_hash,
    }
