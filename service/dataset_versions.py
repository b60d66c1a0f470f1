"""Dataset versions: a new version is its parent plus labelled images (from a dataset of
unlabelled images, or an archive), immutable, naming its parent and what it added. Only the
added images are stored (``models.data.versions``); hosts rebuild a version's tree from its
chain (``Storage.local_dataset``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sqlalchemy.orm import Session

from ftune.models.data.discover import inspect_dataset
from ftune.models.data.sandbox import SandboxResult, unpack_and_inspect
from ftune.models.data.trees import remove_tree
from ftune.models.data.versions import Delta, NewImage, overlay, write_delta
from ftune.service.auth.principal import Principal
from ftune.service.blobs import deletions
from ftune.service.blobs.keys import dataset_key, prefixes_of
from ftune.service.datasets import (
    DatasetChecks,
    clean_name,
    forget_object,
    get_dataset,
    new_dataset,
    record_dataset,
)
from ftune.service.db.session import Database
from ftune.service.db.tables import Dataset
from ftune.service.errors import Conflict, DatasetRejected, InvalidInput
from ftune.service.ids import new_id
from ftune.service.quotas import Limits, upload_allowance, usage_of
from ftune.service.storage import Storage

MAX_CHAIN = 10_000  # versions along one chain: far past any real labelling loop


def chain_of(session: Session, dataset: Dataset) -> list[Dataset]:
    """The dataset and its parents, oldest first (an upload: itself alone)."""
    chain = [dataset]
    while chain[-1].parent_id is not None and len(chain) < MAX_CHAIN:
        parent = session.get(Dataset, chain[-1].parent_id)
        if parent is None:  # cannot happen while parents with versions cannot be deleted
            break
        chain.append(parent)
    return chain[::-1]


def parts_of(session: Session, dataset: Dataset) -> list[tuple[str, str | None]]:
    """What a host needs to rebuild the dataset's tree: (id, tar SHA-256) oldest first."""
    return [(d.id, d.blob_sha256) for d in chain_of(session, dataset)]


# Findings about the shape of the added images alone (one class, few images): the version's
# whole tree is checked after, with the real limits.
PARTIAL_SHAPE = frozenset({"too_few_classes", "too_few_images"})
MAX_LABELS = 100_000
MAX_LABEL_CHARS = 200


@dataclass(frozen=True)
class Additions:
    images: list[NewImage]
    source: dict  # where they come from, as ``added`` records it


def from_unlabeled(session: Session, storage: Storage, principal: Principal, parent: Dataset,
                   unlabeled_id: str, labels: dict[str, str | list[str]]) -> Additions:
    """Labels for images of one of the tenant's datasets of unlabelled images; 422 naming
    paths that are not among its images."""
    other = get_dataset(session, principal, unlabeled_id)
    if other.kind != "unlabeled" or other.tenant_id != parent.tenant_id:
        raise InvalidInput(f"unlabeled_dataset_id: dataset {other.id} is not a dataset of "
                           "unlabelled images of this tenant", loc=["body", "unlabeled_dataset_id"])
    if other.blob_sha256 is None:
        raise Conflict(f"dataset {other.id}'s images are gone from the store")
    tree = storage.local_tree(dataset_key(other.id), other.blob_sha256, owner=other.tenant_id)
    unknown = [p for p in labels if not inside(tree, p)]
    if unknown:
        raise InvalidInput(f"labels: {len(unknown)} path(s) are not images of dataset "
                           f"{other.id}: {', '.join(repr(p[:80]) for p in unknown[:5])}",
                           loc=["body", "labels"])
    images = [NewImage(tree / path, PurePosixPath(path).name, _names(path, value))
              for path, value in labels.items()]
    return Additions(images, {"from": "unlabeled_dataset", "unlabeled_dataset_id": other.id})


def _names(path: str, value: str | list[str]) -> tuple[str, ...]:
    """An image's labels, each a name a class may have; 422 naming the image otherwise."""
    names = tuple(value) if isinstance(value, list) else (value,)
    for name in names:
        if not 0 < len(name) <= MAX_LABEL_CHARS or not name.isprintable() or \
                any(c in name for c in '/\\'):
            raise InvalidInput(f"labels: {path[:80]!r}: {name[:80]!r} cannot name a class (1 "
                               f"to {MAX_LABEL_CHARS} printable characters, no slashes)",
                               loc=["body", "labels"])
    return names


def inside(tree: Path, relative: str) -> bool:
    """Whether ``relative`` names a file of ``tree`` (no way out of it, no link)."""
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return False
    try:
        return (tree / path).is_file() and not (tree / path).is_symlink()
    except (OSError, ValueError):  # a NUL byte, a name too long
        return False


def from_archive(folder: Path, filename: str | None) -> Additions:
    """The labelled images of an unpacked, checked archive (``unpack_and_inspect``)."""
    index = inspect_dataset(folder, check_images=False).index
    names = index.classes
    images = [NewImage(s.path, s.path.name,
                       tuple(names[t] for t in s.targets) if s.targets is not None
                       else (names[s.label],))
              for s in [*index.train, *(index.val or []), *(index.test or [])]]
    return Additions(images, {"from": "archive", "filename": filename})


def check_archive(found: SandboxResult) -> None:
    """The added images' own check: everything but the shape of so few images."""
    blocking = [e for e in found.errors if e["code"] not in PARTIAL_SHAPE]
    if blocking:
        raise DatasetRejected("the archive of new images cannot be used: " + "; ".join(
            f"{e['message']}. {e['action']}" for e in blocking), found.report)


def build_version(*, parent_tree: Path, additions: Additions, version_id: str,
                  staging: Path, checks: DatasetChecks) -> tuple[Delta, SandboxResult]:
    """The delta written under ``staging/delta`` and the whole version checked (in the
    sandbox, as an upload is); 422 when nothing is new or the version has blocking
    problems."""
    delta = write_delta(parent_tree, additions.images, staging / "delta", version_id[:8])
    if not delta.added:
        raise InvalidInput(f"nothing new: the {len(delta.duplicates)} image(s) are in the "
                           "dataset already (compared by content)")
    overlay([parent_tree, staging / "delta"], staging / "version")
    found = unpack_and_inspect(
        None, staging / "version", limits=checks.limits, min_per_class=checks.min_per_class,
        max_pixels=checks.max_pixels, max_classes=checks.max_classes,
        memory_mb=checks.memory_mb, cpu_s=checks.cpu_s, timeout_s=checks.timeout_s)
    if not found.ok:
        raise DatasetRejected("the new version cannot be used: " + "; ".join(
            f"{e['message']}. {e['action']}" for e in found.errors), found.report)
    return delta, found


Collect = Callable[[Session, Dataset], Additions]


def create_version(db: Database, storage: Storage, principal: Principal, *, parent_id: str,
                   collect: Collect, checks: DatasetChecks, limits: Limits,
                   name: str | None = None) -> Dataset:
    """A new version of ``parent_id`` with the images ``collect`` finds; the parent is never
    changed. Quotas as for an upload: the version counts as a dataset of the bytes it adds."""
    name = None if name is None else clean_name(name, None)
    with db.session() as session:
        parent = get_dataset(session, principal, parent_id)
        if parent.kind != "labeled":
            raise InvalidInput(f"dataset {parent.id} holds unlabelled images: a version adds "
                               "labelled images to a labelled dataset")
        parts = parts_of(session, parent)
        if any(sha256 is None for _, sha256 in parts):
            raise Conflict(f"dataset {parent.id} (or a version it was made from) has no "
                           "images in the store")
        upload_allowance(usage_of(session, parent.tenant_id), limits)  # 429 when full
        additions = collect(session, parent)
        tenant_id, parent_name, parent_version = parent.tenant_id, parent.name, parent.version
    version_id = new_id()
    staging = storage.datasets / f".{version_id}.version"
    key, stored = dataset_key(version_id), False
    try:
        parent_tree = storage.local_dataset(parts, owner=tenant_id)
        delta, found = build_version(parent_tree=parent_tree, additions=additions,
                                     version_id=version_id, staging=staging, checks=checks)
        dataset = new_dataset(version_id, tenant_id, name or parent_name, found)
        dataset.parent_id, dataset.version, dataset.task = parent_id, parent_version + 1, \
            found.report.get("task")
        dataset.size_bytes = _bytes(staging / "delta")  # what it stores: only what it adds
        dataset.added = {**additions.source, "images": len(delta.added),
                         "by_class": delta.by_class, "copies_left_out": len(delta.duplicates)}
        dataset.report = {**found.report, "changes": _changes(dataset.added, parent_id, parts)}
        with db.session() as session:
            deletions.hold(session, prefixes_of(datasets=[version_id]))
        stored = True
        dataset.blob_sha256 = storage.put_tree(key, staging / "delta").sha256
        with db.session() as session:
            record_dataset(session, dataset, limits, dedupe=False)
    except BaseException:
        if stored:
            forget_object(storage, key)
        raise
    finally:
        remove_tree(staging)
    return dataset


def _changes(added: dict, parent_id: str, parts: list) -> dict:
    """What the lint report says changed from the parent (``version_of``: the upload the
    chain started from)."""
    return {"parent_id": parent_id, "version_of": parts[0][0], "added": added["images"],
            "by_class": added["by_class"], "copies_left_out": added["copies_left_out"]}


def _bytes(folder: Path) -> int:
    return sum((Path(top) / name).stat().st_size
               for top, _, names in os.walk(folder) for name in names)
