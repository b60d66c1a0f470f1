"""Which layout a dataset folder uses, and which files are candidate images, before any image
is opened.

Layouts, looked for in this order, directly under DATA or under one top folder:
- ``labels.csv`` (header with ``path`` and ``label`` or ``labels``, optionally ``split``; paths
  relative to the folder holding the CSV) next to the images. A dataset is multi-label when the
  column is ``labels``, when a row names several labels (separated by ``;`` or ``|``), or when
  rows list one image with different labels; then an image may have no label at all (a
  negative for every class). Folder layouts are single-label;
- ``train/<class>/...`` with optional ``val/<class>/...`` and ``test/<class>/...``;
- ``<class>/<images>``.
Images without a label go in an ``unlabeled/`` folder beside the class folders (or beside
``train/``), at any depth; ``unlabeled`` is therefore no class name. A dataset of unlabelled
images alone (``kind="unlabeled"``) may hold its images in any folders.
Hidden files and folders (dot-files, ``__MACOSX``, ``Thumbs.db``, ``desktop.ini``) and files
that are not images are ignored, with the reason.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, NamedTuple

from ftune.models.data.images import is_image_name
from ftune.models.settings import engine_settings

SPLIT_DIRS = {"train": ("train", "training"), "val": ("val", "valid", "validation"),
              "test": ("test", "testing")}
MANIFEST = "labels.csv"
HIDDEN_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini", "Desktop.ini"})
MAX_EXAMPLES = 20  # bad manifest rows kept as examples (findings.MAX_ITEMS); all are counted
MAX_LINE_CHARS = 1 << 20  # of one labels.csv line
UNLABELED = "unlabeled"  # the split of images without a label (their class is "")
UNLABELED_NAMES = frozenset({"unlabeled", "unlabelled"})
LABEL_SEPARATORS = re.compile(r"[;|]")
SINGLE_LABEL, MULTI_LABEL = "single_label", "multi_label"


@dataclass(frozen=True)
class Candidate:
    rel: str  # path relative to the dataset folder, for messages
    path: Path
    split: str
    cls: str  # single-label: the class; multi-label: ""
    labels: tuple[str, ...] | None = None  # multi-label: the image's classes, sorted

    @property
    def label_key(self) -> str:
        """What the image is labelled with, as one string (label sets joined by ";")."""
        return self.cls if self.labels is None else ";".join(self.labels)

    @property
    def names(self) -> tuple[str, ...]:
        """The image's classes: its one class, or its label set."""
        return (self.cls,) if self.labels is None else self.labels


class Problem(NamedTuple):
    """Something wrong with the layout: ``count`` of them, ``items`` the first few."""

    code: str
    message: str
    items: list
    # None: len(items). Shadows tuple.count, which nothing calls on a Problem; the name is
    # what the lint report shows.
    count: int | None = None  # type: ignore[assignment]


@dataclass
class Listing:
    """What the layout says, before any file is opened."""

    base: Path
    layout: str  # "class_folders" | "split_folders" | "csv_manifest" | "unlabeled"
    task: str = SINGLE_LABEL  # or MULTI_LABEL (labels.csv only)
    candidates: list[Candidate] = field(default_factory=list)
    declared: dict[str, list[str]] = field(default_factory=dict)  # split -> class names
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (rel path, reason)
    problems: list[Problem] = field(default_factory=list)


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name in HIDDEN_NAMES


def is_unlabeled_dir(name: str) -> bool:
    return name.lower() in UNLABELED_NAMES


def split_of(name: str) -> str | None:
    lowered = name.lower()
    return next((split for split, names in SPLIT_DIRS.items() if lowered in names), None)


def visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not is_hidden(p.name))


def list_dataset(root: Path, kind: str = "labeled") -> Listing:
    """What the folder holds. ``kind="unlabeled"``: every image is an unlabelled one."""
    if kind == UNLABELED:
        return _unlabeled_listing(root, walk_files(root))
    base = dataset_base(root)
    files = walk_files(base)
    if (base / MANIFEST).is_file():
        listing = _manifest_listing(base, files)
        _reserved_names(listing)
        return listing
    top = {split_of(d.name) for d in visible_dirs(base)}
    if top & set(SPLIT_DIRS):
        listing = _folder_listing(base, files, "split_folders")
        if "train" not in listing.declared:
            listing.problems.append(Problem("val_without_train", "found val/ or test/ but no "
                                            "train/ folder next to it", []))
        _reserved_names(listing)
        return listing
    return _folder_listing(base, files, "class_folders")


def _unlabeled_listing(base: Path, files: list[PurePosixPath]) -> Listing:
    listing = Listing(base, UNLABELED)
    for rel in files:
        if any(is_hidden(part) for part in rel.parts):
            listing.ignored.append((str(rel), "hidden"))
        elif not is_image_name(Path(rel.name)):
            listing.ignored.append((str(rel), "not an image"))
        else:
            listing.candidates.append(Candidate(str(rel), base / rel, UNLABELED, ""))
    return listing


def _reserved_names(listing: Listing) -> None:
    """A class called "unlabeled" (under train/, or a label in labels.csv) is ambiguous."""
    used = sorted({name for names in listing.declared.values() for name in names
                   if is_unlabeled_dir(name)})
    if used:
        listing.problems.append(Problem(
            "reserved_name", f"'{used[0]}' is a reserved name (the folder of unlabelled "
            "images) and cannot be a class", [f"class {name}" for name in used]))


def dataset_base(root: Path) -> Path:
    """Archives often wrap everything in one folder; look through it. A lone folder holding
    images and no folders is a class (a dataset of one class), not a wrapper."""
    while not (root / MANIFEST).is_file():
        dirs = visible_dirs(root)
        if (len(dirs) == 1 and not _holds_images(root) and split_of(dirs[0].name) is None
                and not is_unlabeled_dir(dirs[0].name)
                and not (_holds_images(dirs[0]) and not visible_dirs(dirs[0]))):
            root = dirs[0]
        else:
            return root
    return root


def _holds_images(folder: Path) -> bool:
    return any(p.is_file() and not is_hidden(p.name) and is_image_name(p)
               for p in folder.iterdir())


def walk_files(base: Path) -> list[PurePosixPath]:
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
        for split_dir in visible_dirs(base):
            split = split_of(split_dir.name)
            if split is not None:
                listing.declared[split] = [d.name for d in visible_dirs(split_dir)]
    else:
        listing.declared["train"] = [d.name for d in visible_dirs(base)
                                     if not is_unlabeled_dir(d.name)]
    for rel in files:
        candidate, reason = _folder_candidate(base, rel, layout)
        if candidate is not None:
            listing.candidates.append(candidate)
        else:
            listing.ignored.append((str(rel), reason))
    return listing


def _folder_candidate(base: Path, rel: PurePosixPath,
                      layout: str) -> tuple[Candidate | None, str]:
    """The file as a candidate image, or None and the reason it is ignored."""
    if any(is_hidden(part) for part in rel.parts):
        return None, "hidden"
    parts = rel.parts
    if len(parts) > 1 and is_unlabeled_dir(parts[0]):  # beside the classes, or beside train/
        if not is_image_name(Path(parts[-1])):
            return None, "not an image"
        return Candidate(str(rel), base / rel, UNLABELED, ""), ""
    split = "train"
    if layout == "split_folders":
        named = split_of(parts[0]) if len(parts) > 1 else None
        if named is None:
            return None, "outside train/, val/ and test/"
        split, parts = named, parts[1:]
    if len(parts) < 2:
        return None, "not inside a class folder"
    if not is_image_name(Path(parts[-1])):
        return None, "not an image"
    return Candidate(str(rel), base / rel, split, parts[0]), ""


def _manifest_listing(base: Path, files: list[PurePosixPath]) -> Listing:
    listing = Listing(base, "csv_manifest")
    read = _read_manifest(base, listing)
    if read is None:
        return listing
    rows, plural = read
    bad_rows = Sampled()
    images: dict[tuple[str, str], tuple[int, list[str]]] = {}  # (path, split) -> first line, labels
    for number, raw in rows:
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()
               if isinstance(v, str) or v is None}
        entry, reason = _manifest_row(base, row)
        if entry is None:
            bad_rows.add({"row": f"{MANIFEST} line {number}", "reason": reason})
        else:
            images.setdefault(entry[:2], (number, []))[1].extend(entry[2])
    if listing.problems:  # the CSV could not be read to the end: nothing in it is used
        return listing
    several = any(len(set(names)) > 1 for _, names in images.values())
    listing.task = MULTI_LABEL if plural or several else SINGLE_LABEL
    for (name, split), (number, names) in images.items():
        candidate = _manifest_candidate(base, name, split, names, listing.task)
        if candidate is None:
            bad_rows.add({"row": f"{MANIFEST} line {number}", "reason": "empty label"})
        else:
            listing.candidates.append(candidate)
    if bad_rows.total:
        listing.problems.append(Problem("manifest_rows", f"{bad_rows.total} row(s) of "
                                        f"{MANIFEST} were skipped", bad_rows.items,
                                        bad_rows.total))
    _declare_manifest_classes(listing)
    listed = {MANIFEST} | {c.rel for c in listing.candidates}
    for rel in files:
        if str(rel) not in listed:
            hidden = any(is_hidden(part) for part in rel.parts)
            listing.ignored.append((str(rel), "hidden" if hidden else f"not listed in {MANIFEST}"))
    return listing


def _manifest_candidate(base: Path, rel: str, split: str, names: list[str],
                        task: str) -> Candidate | None:
    """One image of the CSV; None for a single-label image without its label."""
    if task == MULTI_LABEL:
        return Candidate(rel, base / rel, split, "", tuple(sorted(set(names))))
    return Candidate(rel, base / rel, split, names[0]) if names else None


def _declare_manifest_classes(listing: Listing) -> None:
    """The splits the CSV uses and their classes (a multi-label split of images without
    labels is still a split: its images are negatives)."""
    for split in SPLIT_DIRS:
        in_split = [c for c in listing.candidates if c.split == split]
        names = sorted({n for c in in_split for n in c.names})
        if names or (in_split and listing.task == MULTI_LABEL):
            listing.declared[split] = names


class Sampled:
    """The first ``MAX_EXAMPLES`` of many items and the count of all of them: a manifest with
    millions of bad rows holds only a few in memory."""

    def __init__(self) -> None:
        self.items: list = []
        self.total = 0

    def add(self, item: object) -> None:
        self.total += 1
        if len(self.items) < MAX_EXAMPLES:
            self.items.append(item)


def _read_manifest(base: Path, listing: Listing
                   ) -> tuple[Iterator[tuple[int, dict]], bool] | None:
    """The CSV's rows with their line numbers, read as they are used, and whether its label
    column is ``labels`` (multi-label); None (and a problem on the listing) when the header is
    unusable. A row past the limit, or a read error midway, ends the rows with a problem on the
    listing."""
    try:
        f = open(base / MANIFEST, newline="", encoding="utf-8-sig")  # noqa: SIM115 - below
    except OSError as exc:
        listing.problems.append(Problem("manifest_invalid",
                                        f"{MANIFEST} cannot be read: {exc}", []))
        return None
    try:
        reader = csv.DictReader(_bounded_lines(f))
        header = [h.strip().lower() for h in (reader.fieldnames or []) if h]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        f.close()
        listing.problems.append(Problem("manifest_invalid",
                                        f"{MANIFEST} cannot be read: {exc}", []))
        return None
    if "path" not in header or not {"label", "labels"} & set(header):
        f.close()
        listing.problems.append(Problem(
            "manifest_invalid", f"{MANIFEST} needs a header row with 'path' and 'label' "
            f"(or 'labels') columns (found: {header or 'nothing'})", []))
        return None
    if {"label", "labels"} <= set(header):
        f.close()
        listing.problems.append(Problem(
            "manifest_invalid", f"{MANIFEST} has both a 'label' and a 'labels' column; "
            "keep one", []))
        return None
    return _manifest_rows(f, reader, listing), "labels" in header


def _bounded_lines(f: IO[str]) -> Iterator[str]:
    """The file's lines, refusing one too long to hold (the csv module reads whole lines)."""
    while line := f.readline(MAX_LINE_CHARS):
        if len(line) == MAX_LINE_CHARS and not line.endswith("\n"):
            raise csv.Error(f"a line is longer than {MAX_LINE_CHARS} characters")
        yield line


def _manifest_rows(f: IO[str], reader: csv.DictReader, listing: Listing
                   ) -> Iterator[tuple[int, dict]]:
    limit = max_manifest_rows()
    with f:
        try:
            for number, row in enumerate(reader, start=2):
                if number - 1 > limit:
                    listing.problems.append(Problem(
                        "manifest_invalid", f"{MANIFEST} has more than {limit} rows "
                        "(FTUNE_MAX_ARCHIVE_FILES)", []))
                    return
                yield number, row
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            listing.problems.append(Problem("manifest_invalid",
                                            f"{MANIFEST} cannot be read: {exc}", []))


def max_manifest_rows() -> int:
    """No more rows than an archive may hold entries: each row names a file."""
    return engine_settings().max_archive_files


def _manifest_row(base: Path, row: dict[str, str]
                  ) -> tuple[tuple[str, str, list[str]] | None, str]:
    """The row as (path, split, labels), or None and why the row is skipped. An empty label is
    kept (an image without labels, for multi-label) and judged once the task is known."""
    name = row.get("path", "")
    labels = [n.strip() for n in LABEL_SEPARATORS.split(row.get("labels", row.get("label", "")))]
    split = split_of(row["split"]) if row.get("split") else "train"
    rel = PurePosixPath(name.replace("\\", "/"))
    if not name:
        return None, "empty path"
    if not rel.parts:
        return None, f"path {name!r} does not name a file"
    if rel.is_absolute() or ".." in rel.parts or ":" in rel.parts[0]:
        return None, f"path {name!r} points outside the dataset"
    if split is None:
        return None, f"split {row.get('split')!r} is not train, val or test"
    if not _is_file(base / rel):
        return None, f"{name} does not exist"
    if not is_image_name(Path(name)):
        return None, f"{name} is not an image"
    return (str(rel), split, [n for n in labels if n]), ""


def _is_file(path: Path) -> bool:
    """A regular file; False for names the file system refuses (too long, say)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False
