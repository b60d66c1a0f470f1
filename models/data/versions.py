"""Dataset versions: a version is its parent's files plus a delta, laid out as the parent is
laid out, so that the parent's tree with the delta copied over it is the version's tree.

The delta holds only the new images (and, for a ``labels.csv`` dataset, the whole new
manifest, which replaces the parent's): a version stores, and a quota counts, only the bytes
it adds. New images go where the parent keeps its training images: ``<class>/`` beside the
class folders, ``train/<class>/`` in split folders, or under ``added/<tag>/`` with their rows
appended to the manifest (split ``train`` where it has a split column). Images whose bytes
the parent already holds, or that come twice, are left out (deduplicated by content).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ftune.models.data.inspect import file_sha256
from ftune.models.data.layout import (
    MANIFEST,
    MULTI_LABEL,
    list_dataset,
    split_of,
    visible_dirs,
)
from ftune.models.errors import DatasetError


@dataclass(frozen=True)
class NewImage:
    source: Path  # where its bytes are now
    name: str  # a file name for it (made unique in the delta)
    labels: tuple[str, ...]  # its class, or (a multi-label manifest) its label set


@dataclass(frozen=True)
class Delta:
    added: list[str]  # paths written, relative to the delta's root
    duplicates: list[str]  # names of the new images whose bytes were there already
    by_class: dict[str, int]  # new images per label


def write_delta(parent: Path, images: list[NewImage], out: Path, tag: str) -> Delta:
    """Lay ``images`` out under ``out`` as ``parent`` lays out its training images (``tag``
    names this version's files); DatasetError for labels the layout cannot hold."""
    listing = list_dataset(parent)
    base = listing.base.relative_to(parent)
    known = {file_sha256(c.path) for c in listing.candidates}
    rows: list[tuple[str, tuple[str, ...]]] = []
    added, duplicates, by_class = [], [], dict[str, int]()
    for image in images:
        digest = file_sha256(image.source)
        if digest in known:
            duplicates.append(image.name)
            continue
        known.add(digest)
        relative = _place(listing.layout, listing.base, image, tag, digest)
        target = out / base / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image.source, target)
        added.append((base / relative).as_posix())
        rows.append((relative.as_posix(), image.labels))
        for label in image.labels:
            by_class[label] = by_class.get(label, 0) + 1
    if listing.layout == "csv_manifest" and rows:
        manifest = _appended_manifest(listing.base / MANIFEST, rows,
                                      multi=listing.task == MULTI_LABEL)
        (out / base / MANIFEST).parent.mkdir(parents=True, exist_ok=True)
        (out / base / MANIFEST).write_text(manifest)
    return Delta(added, duplicates, by_class)


def _place(layout: str, base: Path, image: NewImage, tag: str, digest: str) -> Path:
    name = f"{tag}-{digest[:12]}-{Path(image.name).name}"
    if layout == "csv_manifest":
        return Path("added") / tag / name
    if len(image.labels) != 1:
        raise DatasetError(f"{image.name}: a dataset of class folders gives each image one "
                           f"label, not {len(image.labels)}")
    label = image.labels[0]
    if not label or "/" in label or label.startswith(".") or split_of(label):
        raise DatasetError(f"{image.name}: {label!r} cannot name a class folder")
    if layout == "split_folders":
        train = next(d.name for d in visible_dirs(base) if split_of(d.name) == "train")
        return Path(train) / label / name
    return Path(label) / name


def _appended_manifest(manifest: Path, rows: list[tuple[str, tuple[str, ...]]], *,
                       multi: bool) -> str:
    """The parent's labels.csv with a row per new image (its other columns left empty)."""
    with manifest.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        kept = list(reader)
    label_column = "labels" if "labels" in header else "label"
    if not multi and any(len(labels) != 1 for _, labels in rows):
        raise DatasetError("this dataset is single-label: give each new image one label")
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(kept)
    for path, labels in rows:
        row = dict.fromkeys(header, "") | {"path": path, label_column: ";".join(labels)}
        if "split" in header:
            row["split"] = "train"
        writer.writerow(row)
    return out.getvalue()


def overlay(trees: list[Path], out: Path) -> None:
    """``out`` holds the trees' files, later trees' files over earlier ones' (a version's
    chain, oldest first): hard links where the file system allows, copies elsewhere."""
    for tree in trees:
        for folder, _, names in os.walk(tree):
            rel = Path(folder).relative_to(tree)
            (out / rel).mkdir(parents=True, exist_ok=True)
            for name in names:
                target = out / rel / name
                target.unlink(missing_ok=True)
                try:
                    os.link(Path(folder) / name, target)
                except OSError:  # another file system, or links not allowed
                    shutil.copyfile(Path(folder) / name, target)
