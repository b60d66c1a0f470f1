"""Turn a dataset folder into what training needs: classes, splits and usable images, checked.

``inspect_dataset`` never raises for problems in the data: they go into the lint report.
``scan_image_folder`` raises ``DatasetError`` naming every blocking problem. The layout itself is
read by ``layout``, each file is checked by ``inspect``, the report is built by ``lint``.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ftune.models.data.copies import kept_indices
from ftune.models.data.inspect import FileFacts, inspect_image
from ftune.models.data.layout import (
    MULTI_LABEL,
    SINGLE_LABEL,
    SPLIT_DIRS,
    UNLABELED,
    Candidate,
    list_dataset,
)
from ftune.models.data.lint import LintReport, build_report
from ftune.models.errors import DatasetError
from ftune.models.settings import engine_settings


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # -1: unlabelled, or a multi-label image (see targets)
    sha256: str | None = field(default=None, compare=False)  # of the file's bytes
    # Multi-label: the indices of the image's classes (empty: a negative for every class).
    targets: tuple[int, ...] | None = None


@dataclass
class ImageFolderIndex:
    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample] | None  # None: no val split, split train instead
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    test: list[Sample] | None = None
    layout: str = "class_folders"
    content_hash: str | None = None
    # Images without a label (unlabeled/, or a dataset of kind "unlabeled"), copies of
    # labelled images left out; and their own content hash.
    unlabeled: list[Sample] = field(default_factory=list)
    unlabeled_hash: str | None = None
    task: str = SINGLE_LABEL  # or MULTI_LABEL

    @property
    def multi_label(self) -> bool:
        return self.task == MULTI_LABEL


@dataclass
class Inspection:
    index: ImageFolderIndex
    report: LintReport


def _check_files(candidates: list[Candidate], max_pixels: int | None) -> list[FileFacts]:
    # Decoding and hashing release the GIL, so threads check several files at once.
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda c: inspect_image(c.path, max_pixels), candidates))


def content_hash(entries: list[tuple[str, str, str]]) -> str:
    """Stable whatever the order in the archive or the file names: split, class and bytes."""
    digest = hashlib.sha256()
    for split, cls, sha in sorted(entries):
        digest.update(f"{split}\t{cls}\t{sha}\n".encode())
    return digest.hexdigest()


def inspect_dataset(data: str | Path, *, check_images: bool = True,
                    min_per_class: int | None = None,
                    max_pixels: int | None = None, kind: str = "labeled") -> Inspection:
    """``kind="unlabeled"``: a dataset of unlabelled images only (no classes)."""
    root = Path(data)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    listing = list_dataset(root, kind)
    facts = (_check_files(listing.candidates, max_pixels) if check_images
             else [FileFacts(None)] * len(listing.candidates))
    classes = sorted(set(listing.declared.get("train", [])))
    pairs = list(zip(listing.candidates, facts, strict=True))
    splits = _split_samples(pairs, classes, declared=listing.declared)
    index = ImageFolderIndex(
        root=root, classes=classes, train=splits.get("train", []), val=splits.get("val"),
        test=splits.get("test"), layout=listing.layout, task=listing.task,
        skipped=[(c.rel, f.error) for c, f in pairs if f.error is not None],
        content_hash=_hash_usable(pairs, classes) if check_images else None)
    index.unlabeled = unlabeled_samples(pairs)
    if check_images and index.unlabeled:
        index.unlabeled_hash = content_hash([(UNLABELED, "", s.sha256 or "")
                                             for s in index.unlabeled])
    minimum = min_per_class or engine_settings().min_images_per_class
    report = build_report(listing, facts, classes, min_per_class=minimum, checked=check_images)
    return Inspection(index, report)


def _split_samples(pairs: list[tuple[Candidate, FileFacts]], classes: list[str], *,
                   declared: dict[str, list[str]]) -> dict[str, list[Sample]]:
    """Usable images of each declared split, labelled by their class's index (multi-label: by
    the indices of their classes known to train)."""
    label_of = {name: i for i, name in enumerate(classes)}

    def sample(c: Candidate, f: FileFacts) -> Sample:
        if c.labels is None:
            return Sample(c.path, label_of[c.cls], f.sha256)
        return Sample(c.path, -1, f.sha256,
                      tuple(sorted(label_of[n] for n in c.labels if n in label_of)))

    return {split: [sample(c, f) for c, f in pairs
                    if c.split == split and f.error is None
                    and (c.labels is not None or c.cls in label_of)]
            for split in SPLIT_DIRS if split in declared}


def unlabeled_samples(pairs: list[tuple[Candidate, FileFacts]]) -> list[Sample]:
    """Usable unlabelled images, once each, without copies of labelled ones."""
    labelled = {f.sha256 for c, f in pairs if c.split != UNLABELED and f.sha256}
    return without_copies([Sample(c.path, -1, f.sha256) for c, f in pairs
                           if c.split == UNLABELED and f.error is None], labelled)


def without_copies(samples: list[Sample], labelled: set[str]) -> list[Sample]:
    """``samples`` once each and without copies of labelled images (by content)."""
    return [samples[i] for i in kept_indices([s.sha256 for s in samples], labelled)]


def _hash_usable(pairs: list[tuple[Candidate, FileFacts]], classes: list[str]) -> str:
    """Multi-label images hash their label sets (known to train), marked as such."""
    known = set(classes)

    def key(c: Candidate) -> str:
        if c.labels is None:
            return c.cls
        return f"{MULTI_LABEL}:" + ";".join(n for n in c.labels if n in known)

    return content_hash([(c.split, key(c), f.sha256 or "") for c, f in pairs
                         if f.error is None and (c.labels is not None or c.cls in known)])


def dataset_hash(index: ImageFolderIndex) -> str | None:
    """What identifies the whole upload: the labelled content and the unlabelled images."""
    if index.unlabeled_hash is None:
        return index.content_hash
    if index.layout == UNLABELED:
        return index.unlabeled_hash
    return hashlib.sha256(f"{index.content_hash}+{index.unlabeled_hash}".encode()).hexdigest()


def scan_image_folder(data: str | Path, *, check_images: bool = True,
                      min_per_class: int | None = None,
                      kind: str = "labeled") -> ImageFolderIndex:
    """The dataset ready for training; DatasetError naming every blocking problem."""
    inspection = inspect_dataset(data, check_images=check_images, min_per_class=min_per_class,
                                 kind=kind)
    errors = inspection.report.errors
    if errors:
        raise DatasetError("; ".join(f"{e.message}. {e.action}" for e in errors))
    return inspection.index
