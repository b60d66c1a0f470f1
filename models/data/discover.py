"""Find the classes, splits and images of a dataset folder, and check every file.

Layouts, looked for in this order, directly under DATA or under one top folder:
- ``labels.csv`` (header with ``path,label`` and optionally ``split``; paths relative to the
  folder holding the CSV) next to the images;
- ``train/<class>/...`` with optional ``val/<class>/...`` and ``test/<class>/...``;
- ``<class>/<images>``.
Hidden files and folders (dot-files, ``__MACOSX``, ``Thumbs.db``, ``desktop.ini``) and files
that are not images are ignored and counted; files that do not decode are skipped and listed.
``inspect_dataset`` never raises for problems in the data: they go into the lint report.
"""

from __future__ import annotations

import csv
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from models.data.images import is_image_name
from models.data.inspect import FileFacts, inspect_image
from models.data.lint import LintReport, build_report
from models.errors import DatasetError

SPLIT_DIRS = {"train": ("train", "training"), "val": ("val", "valid", "validation"),
              "test": ("test", "testing")}
MANIFEST = "labels.csv"
HIDDEN_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini", "Desktop.ini"})
DEFAULT_MIN_PER_CLASS = 2


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass(frozen=True)
class Candidate:
    rel: str  # path relative to the dataset folder, for messages
    path: Path
    split: str
    cls: str


@dataclass
class Listing:
    """What the layout says, before any file is opened."""

    base: Path
    layout: str  # "class_folders" | "split_folders" | "csv_manifest"
    candidates: list[Candidate] = field(default_factory=list)
    declared: dict[str, list[str]] = field(default_factory=dict)  # split -> class names
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (rel path, reason)
    problems: list[tuple[str, str, list]] = field(default_factory=list)  # code, message, items


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


@dataclass
class Inspection:
    index: ImageFolderIndex
    report: LintReport


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name in HIDDEN_NAMES


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not is_hidden(p.name))


def _split_of(name: str) -> str | None:
    lowered = name.lower()
    return next((split for split, names in SPLIT_DIRS.items() if lowered in names), None)


def _dataset_base(root: Path) -> Path:
    # Archives often wrap everything in one folder; look through it.
    while not (root / MANIFEST).is_file():
        dirs = _visible_dirs(root)
        has_files = any(p.is_file() and not is_hidden(p.name) and is_image_name(p)
                        for p in root.iterdir())
        if len(dirs) == 1 and not has_files and _split_of(dirs[0].name) is None:
            root = dirs[0]
        else:
            return root
    return root


def _walk_files(base: Path) -> list[PurePosixPath]:
    """Every regular file below ``base`` as a relative path, links never followed."""
    found = []
    for folder, dirs, files in os.walk(base, followlinks=False):
        dirs.sort()
        rel_folder = PurePosixPath(Path(folder).relative_to(base).as_posix())
        for name in sorted(files):
            if (Path(folder) / name).is_file() and not (Path(folder) / name).is_symlink():
                found.append(rel_folder / name)
    return found


def _folder_listing(base: Path, files: list[PurePosixPath], layout: str) -> Listing:
    listing = Listing(base, layout)
    if layout == "split_folders":
        for split_dir in _visible_dirs(base):
            split = _split_of(split_dir.name)
            if split is not None:
                listing.declared[split] = [d.name for d in _visible_dirs(split_dir)]
    else:
        listing.declared["train"] = [d.name for d in _visible_dirs(base)]
    for rel in files:
        if any(is_hidden(part) for part in rel.parts):
            listing.ignored.append((str(rel), "hidden"))
            continue
        parts = rel.parts
        if layout == "split_folders":
            split = _split_of(parts[0]) if len(parts) > 1 else None
            if split is None:
                listing.ignored.append((str(rel), "outside train/, val/ and test/"))
                continue
            parts = parts[1:]
        else:
            split = "train"
        if len(parts) < 2:
            listing.ignored.append((str(rel), "not inside a class folder"))
        elif not is_image_name(Path(parts[-1])):
            listing.ignored.append((str(rel), "not an image"))
        else:
            listing.candidates.append(Candidate(str(rel), base / rel, split, parts[0]))
    return listing


def _manifest_listing(base: Path, files: list[PurePosixPath]) -> Listing:
    listing = Listing(base, "csv_manifest")
    listed: set[str] = {MANIFEST}
    try:
        with open(base / MANIFEST, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            header = [h.strip().lower() for h in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        listing.problems.append(("manifest_invalid", f"{MANIFEST} cannot be read: {exc}", []))
        return listing
    if not {"path", "label"} <= set(header):
        listing.problems.append(("manifest_invalid", f"{MANIFEST} needs a header row with "
                                 f"'path' and 'label' columns (found: {header or 'nothing'})",
                                 []))
        return listing
    bad_rows: list[dict] = []
    for number, raw in enumerate(rows, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
        name, label = row.get("path", ""), row.get("label", "")
        split = _split_of(row.get("split") or "train") if row.get("split") else "train"
        where = f"{MANIFEST} line {number}"
        rel = PurePosixPath(name.replace("\\", "/"))
        if not name or not label:
            bad_rows.append({"row": where, "reason": "empty path or label"})
        elif rel.is_absolute() or ".." in rel.parts or ":" in rel.parts[0]:
            bad_rows.append({"row": where, "reason": f"path {name!r} points outside the dataset"})
        elif split is None:
            bad_rows.append({"row": where,
                             "reason": f"split {row.get('split')!r} is not train, val or test"})
        elif not (base / rel).is_file():
            bad_rows.append({"row": where, "reason": f"{name} does not exist"})
        elif not is_image_name(Path(name)):
            bad_rows.append({"row": where, "reason": f"{name} is not an image"})
        else:
            listed.add(str(rel))
            listing.candidates.append(Candidate(str(rel), base / rel, split, label))
    if bad_rows:
        listing.problems.append(("manifest_rows", f"{len(bad_rows)} row(s) of {MANIFEST} "
                                 "were skipped", bad_rows))
    for split in SPLIT_DIRS:
        names = sorted({c.cls for c in listing.candidates if c.split == split})
        if names:
            listing.declared[split] = names
    for rel in files:
        if str(rel) in listed:
            continue
        hidden = any(is_hidden(part) for part in rel.parts)
        listing.ignored.append((str(rel), "hidden" if hidden else f"not listed in {MANIFEST}"))
    return listing


def list_dataset(root: Path) -> Listing:
    base = _dataset_base(root)
    files = _walk_files(base)
    if (base / MANIFEST).is_file():
        return _manifest_listing(base, files)
    top = {_split_of(d.name) for d in _visible_dirs(base)}
    if top & set(SPLIT_DIRS):
        listing = _folder_listing(base, files, "split_folders")
        if "train" not in listing.declared:
            listing.problems.append(("val_without_train", "found val/ or test/ but no train/ "
                                     "folder next to it", []))
        return listing
    return _folder_listing(base, files, "class_folders")


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
                    min_per_class: int = DEFAULT_MIN_PER_CLASS,
                    max_pixels: int | None = None) -> Inspection:
    root = Path(data)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    listing = list_dataset(root)
    facts = (_check_files(listing.candidates, max_pixels) if check_images
             else [FileFacts(None)] * len(listing.candidates))
    classes = sorted(set(listing.declared.get("train", [])))
    label_of = {name: i for i, name in enumerate(classes)}
    splits: dict[str, list[Sample]] = {}
    for split in SPLIT_DIRS:
        if split in listing.declared:
            splits[split] = [Sample(c.path, label_of[c.cls])
                             for c, f in zip(listing.candidates, facts, strict=True)
                             if c.split == split and f.error is None and c.cls in label_of]
    usable = [(c, f) for c, f in zip(listing.candidates, facts, strict=True) if f.error is None]
    entries = [(c.split, c.cls, f.sha256 or "") for c, f in usable if c.cls in label_of]
    index = ImageFolderIndex(
        root=root, classes=classes, train=splits.get("train", []),
        val=splits.get("val"), test=splits.get("test"), layout=listing.layout,
        skipped=[(c.rel, f.error) for c, f in zip(listing.candidates, facts, strict=True)
                 if f.error is not None],
        content_hash=content_hash(entries) if check_images else None)
    report = build_report(listing, facts, classes, min_per_class=min_per_class,
                          checked=check_images)
    return Inspection(index, report)


def scan_image_folder(data: str | Path, *, check_images: bool = True,
                      min_per_class: int = DEFAULT_MIN_PER_CLASS) -> ImageFolderIndex:
    """The dataset ready for training; DatasetError naming every blocking problem."""
    inspection = inspect_dataset(data, check_images=check_images, min_per_class=min_per_class)
    errors = inspection.report.errors
    if errors:
        raise DatasetError("; ".join(f"{e.message}. {e.action}" for e in errors))
    return inspection.index
