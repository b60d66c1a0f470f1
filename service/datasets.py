"""Dataset service functions: turn an uploaded archive into a checked, stored dataset."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ftune.models.data.archives import ArchiveLimits
from ftune.models.data.sandbox import SandboxResult, unpack_and_inspect
from ftune.models.data.trees import remove_tree
from ftune.models.errors import ArchiveTooLarge
from ftune.models.settings import EngineSettings
from ftune.service.auth.principal import Principal
from ftune.service.auth.tenancy import get_visible, visible_rows
from ftune.service.blobs import deletions
from ftune.service.blobs.keys import dataset_key, prefixes_of
from ftune.service.db.tables import Dataset, Job, Sweep
from ftune.service.disk import over_disk_allowance
from ftune.service.errors import (
    Conflict,
    DatasetRejected,
    InvalidInput,
    ServiceError,
    TooManyRequests,
)
from ftune.service.ids import new_id
from ftune.service.job_status import ACTIVE, SweepStatus
from ftune.service.pages import DEFAULT_LIMIT, Keyset, read_page
from ftune.service.quotas import Limits, check_new_dataset, lock_tenant, usage_of
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


KINDS = ("labeled", "unlabeled")


def dataset_kind(value: str | None) -> str:
    """The upload's ``kind`` form field: labelled (the default) or unlabelled images."""
    if value is None or value == "":
        return "labeled"
    if value not in KINDS:
        raise InvalidInput(f"kind: must be labeled or unlabeled, not {value[:40]!r}")
    return value


@dataclass(frozen=True)
class DatasetChecks:
    """What an upload is checked against, and the limits of the child that checks it."""

    limits: ArchiveLimits
    min_per_class: int
    max_pixels: int
    max_classes: int
    memory_mb: int
    cpu_s: int
    timeout_s: float

    @classmethod
    def from_settings(cls, engine: EngineSettings) -> DatasetChecks:
        return cls(limits=ArchiveLimits(max_bytes=int(engine.max_extracted_mb * 2**20),
                                        max_files=engine.max_archive_files),
                   min_per_class=engine.min_images_per_class,
                   max_pixels=engine.max_image_pixels, max_classes=engine.max_classes,
                   memory_mb=engine.unpack_memory_mb, cpu_s=engine.unpack_cpu_s,
                   timeout_s=engine.unpack_timeout_s)


def _find_same_content(session: Session, tenant_id: str, content_hash: str | None,
                       kind: str) -> Dataset | None:
    """The tenant's own copy of this content: another tenant's is never revealed."""
    if content_hash is None:
        return None
    return session.scalar(select(Dataset).where(Dataset.tenant_id == tenant_id,
                                                Dataset.content_hash == content_hash,
                                                Dataset.kind == kind)
                          .order_by(Dataset.created_at).limit(1))


def _summary(errors: list[dict]) -> str:
    problems = "; ".join(f"{e['message']}. {e['action']}" for e in errors)
    return f"the dataset cannot be used: {problems}"


def ingest_archive(session: Session, storage: Storage, *, tenant_id: str, archive: Path,
                   filename: str | None, name: str | None, checks: DatasetChecks,
                   allowance: int | None = None, disk_allowance: int | None = None,
                   dedupe: bool = True, kind: str = "labeled",
                   quota: Limits | None = None) -> tuple[Dataset, bool]:
    """Unpack, check and record a dataset; returns it and whether it is new.

    ``allowance``: bytes the tenant's stored-bytes quota still allowed when the upload
    began; ``quota``: the tenant's limits, checked again at insert under the tenant's lock
    (other uploads may have committed since). ``disk_allowance``: bytes the data disk holds
    above its reserve (see ``disk``). With ``dedupe``, the tenant's own copy of the same
    content is returned. A rejected archive leaves nothing behind; an existing dataset is
    never touched.
    """
    dataset_name = clean_name(name, filename)
    dataset_id = new_id()
    staging = storage.datasets / f".{dataset_id}.staging"
    key = dataset_key(dataset_id)
    stored = False
    try:
        try:
            # Unpacked and checked in a child process with its own limits (models.data.sandbox).
            found = _unpack_within(archive, staging, checks, allowance, disk_allowance, kind)
            if not found.ok:
                raise DatasetRejected(_summary(found.errors), found.report)
            existing = (_find_same_content(session, tenant_id, found.content_hash, kind)
                        if dedupe else None)
            if existing is not None:
                return existing, False
            dataset = new_dataset(dataset_id, tenant_id, dataset_name, found)
            dataset.kind = kind
            dataset.task = found.report.get("task") if kind == "labeled" else None
            # Workers fetch the checked images from the store, never from this host's disk.
            # Held first: if this process dies before the row commits, the images go.
            deletions.hold(session, prefixes_of(datasets=[dataset_id]))
            stored = True
            dataset.blob_sha256 = storage.put_tree(key, staging).sha256
        finally:
            remove_tree(staging)
        earlier = record_dataset(session, dataset, quota, dedupe)
    except BaseException:
        if stored:
            forget_object(storage, key)
        raise
    if earlier is not None:  # the same content, committed by a request racing this one
        forget_object(storage, key)
        return earlier, False
    return dataset, True


def record_dataset(session: Session, dataset: Dataset, quota: Limits | None,
            dedupe: bool) -> Dataset | None:
    """Insert and commit the row (a failed commit also removes the object: the caller's
    ``except``); within ``quota``, counted under the tenant's lock, so uploads racing on
    any API process cannot together pass a quota only some of them fit. Returns the
    tenant's earlier copy of the content instead, if one was committed meanwhile."""
    if quota is not None:
        lock_tenant(session, dataset.tenant_id)
        if dedupe:
            earlier = _find_same_content(session, dataset.tenant_id, dataset.content_hash,
                                         dataset.kind)
            if earlier is not None:
                deletions.schedule(session, prefixes_of(datasets=[dataset.id]))  # due now
                session.commit()
                return earlier
        check_new_dataset(usage_of(session, dataset.tenant_id), quota, dataset.size_bytes)
    session.add(dataset)
    deletions.release(session, prefixes_of(datasets=[dataset.id]))
    session.commit()
    return None


def forget_object(storage: Storage, key: str) -> None:
    try:
        storage.blobs.delete(key)
    except Exception:  # the upload failed already, or the store is down: it was not kept
        log.warning("could not remove %s after a failed upload", key, exc_info=True)


def new_dataset(dataset_id: str, tenant_id: str, name: str, found: SandboxResult) -> Dataset:
    return Dataset(
        id=dataset_id, tenant_id=tenant_id, name=name, classes=found.classes,
        class_counts=found.class_counts, num_images=found.num_images,
        # val null: no val split, one is held out at training time (spec.val_fraction).
        splits={"val": None, **found.splits},
        warnings=[f"{w['message']}. {w['action']}" for w in found.warnings],
        size_bytes=found.size_bytes, content_hash=found.content_hash, report=found.report)


def _unpack_within(archive: Path, staging: Path, checks: DatasetChecks, allowance: int | None,
                   disk_allowance: int | None, kind: str = "labeled") -> SandboxResult:
    """Unpack and check under the engine's limits or, when smaller, what the tenant's quota
    or the disk allows; the tightest bound refuses, with its own reason."""
    # bound -> what refuses an archive over it (None: the engine's own ArchiveTooLarge)
    refusals: dict[int, Callable[[int], ServiceError] | None] = {checks.limits.max_bytes: None}
    if allowance is not None:
        refusals.setdefault(allowance, _over_quota)
    if disk_allowance is not None:
        refusals.setdefault(disk_allowance, partial(over_disk_allowance,
                                                    "unpacking the upload"))
    max_bytes = min(refusals)
    try:
        return unpack_and_inspect(
            archive, staging, limits=replace(checks.limits, max_bytes=max_bytes),
            min_per_class=checks.min_per_class, max_pixels=checks.max_pixels,
            max_classes=checks.max_classes, memory_mb=checks.memory_mb, cpu_s=checks.cpu_s,
            timeout_s=checks.timeout_s, kind=kind)
    except ArchiveTooLarge as exc:
        refusal = refusals[max_bytes]
        if refusal is None:
            raise
        raise refusal(max_bytes) from exc


def _over_quota(allowance: int) -> ServiceError:
    return TooManyRequests(f"quota stored_gb exceeded: the archive unpacks to more than the "
                           f"{allowance} bytes left in the tenant's storage quota; free some or "
                           "ask an operator to raise it")


def get_dataset(session: Session, principal: Principal, dataset_id: str) -> Dataset:
    """The dataset, if it exists and the principal may see it; another tenant's is a 404."""
    return get_visible(session, principal, Dataset, dataset_id, noun="dataset")


def list_datasets(session: Session, principal: Principal, *, limit: int = DEFAULT_LIMIT,
                  cursor: str | None = None) -> tuple[list[Dataset], str | None]:
    """Newest first, a page at a time."""
    return read_page(session, visible_rows(principal, Dataset),
                     Keyset(Dataset.created_at, Dataset.id), limit=limit, cursor=cursor)


def delete_dataset(session: Session, principal: Principal, *, dataset_id: str) -> list[str]:
    """Delete the row; returns its store prefixes, scheduled for deletion
    (``blobs.deletions.remove`` them once the transaction has committed)."""
    dataset = get_dataset(session, principal, dataset_id)
    active = session.scalar(select(func.count()).select_from(Job).where(
        (Job.dataset_id == dataset_id) | (Job.unlabeled_dataset_id == dataset_id),
        Job.status.in_(ACTIVE)))
    if active:
        raise Conflict(f"dataset {dataset_id} is used by {active} queued or running job(s); "
                       "cancel them or wait for them to finish")
    versions = session.scalar(select(func.count()).select_from(Dataset).where(
        Dataset.parent_id == dataset_id))
    if versions:  # a version holds only what it added: its parent's images are its own too
        raise Conflict(f"dataset {dataset_id} has {versions} version(s) made from it; delete "
                       "them first")
    sweeps = session.scalar(select(func.count()).select_from(Sweep).where(
        Sweep.dataset_id == dataset_id, Sweep.status == SweepStatus.RUNNING))
    if sweeps:
        raise Conflict(f"dataset {dataset_id} is used by {sweeps} running sweep(s); cancel "
                       "them or wait for them to finish")
    session.delete(dataset)
    session.flush()
    return deletions.schedule(session, prefixes_of(datasets=[dataset_id]))


def dataset_view(dataset: Dataset) -> dict:
    return {
        "id": dataset.id, "tenant_id": dataset.tenant_id, "name": dataset.name,
        "created_at": dataset.created_at,
        "classes": dataset.classes, "num_images": dataset.num_images, "splits": dataset.splits,
        "class_counts": dataset.class_counts, "warnings": dataset.warnings,
        "size_bytes": dataset.size_bytes, "content_hash": dataset.content_hash,
        "kind": dataset.kind or "labeled", "task": dataset.task,
        "parent_id": dataset.parent_id, "version": dataset.version or 1,
        "added": dataset.added,
    }
