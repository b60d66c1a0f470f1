"""Find the classes and images of an image-folder dataset.

Layouts: ``DATA/<class>/<images>``, or ``DATA/train/<class>/...`` with ``DATA/val/<class>/...``,
either directly under DATA or under one top folder. Hidden files and folders are ignored;
files that are not images, or do not decode, are skipped and listed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from models.data.images import check_decodable, is_image_name
from models.errors import DatasetError

TRAIN_DIRS = ("train", "training")
VAL_DIRS = ("val", "valid", "validation")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class ImageFolderIndex:
    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample] | None  # None: no val folder, split train instead
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)


def _visible(path: Path) -> bool:
    return not path.name.startswith(".") and path.name not in {"__MACOSX", "Thumbs.db"}


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and _visible(p))


def _has_images(path: Path) -> bool:
    return any(p.is_file() and is_image_name(p) for p in path.iterdir() if _visible(p))


def _dataset_root(root: Path) -> Path:
    # Archives often wrap everything in one folder; look through it.
    while True:
        dirs = _subdirs(root)
        if len(dirs) == 1 and not _has_images(root) and dirs[0].name.lower() not in TRAIN_DIRS:
            root = dirs[0]
        else:
            return root


def _find(dirs: list[Path], names: tuple[str, ...]) -> Path | None:
    return next((d for d in dirs if d.name.lower() in names), None)


def _class_files(class_dir: Path) -> list[Path]:
    files = []
    for path in sorted(class_dir.rglob("*")):
        rel = path.relative_to(class_dir)
        if path.is_file() and all(_visible(Path(part)) for part in rel.parts):
            files.append(path)
    return files


def scan_image_folder(data: str | Path, *, check_images: bool = True) -> ImageFolderIndex:
    root = Path(data)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    base = _dataset_root(root)
    top = _subdirs(base)
    train_dir, val_dir = _find(top, TRAIN_DIRS), _find(top, VAL_DIRS)
    if train_dir is None and val_dir is not None:
        raise DatasetError(f"found {val_dir.name}/ but no train/ folder next to it in {base}")
    class_root = train_dir or base
    classes = [d.name for d in _subdirs(class_root)]
    if len(classes) < 2:
        raise DatasetError(
            f"need at least 2 class folders in {class_root}, found {len(classes)}"
            f"{' (' + ', '.join(classes) + ')' if classes else ''}. Expected DATA/<class>/<images>"
            " or DATA/train/<class>/... with DATA/val/<class>/..."
        )
    skipped: list[tuple[str, str]] = []
    train = _collect(class_root, classes, root, skipped, check_images)
    val = _collect(val_dir, classes, root, skipped, check_images) if val_dir else None
    if val_dir is not None:
        extra = sorted({d.name for d in _subdirs(val_dir)} - set(classes))
        if extra:
            raise DatasetError(f"{val_dir.name}/ has classes missing from train/: {extra}")
    counts = {c: 0 for c in classes}
    for sample in train:
        counts[classes[sample.label]] += 1
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise DatasetError(
            f"class folder(s) with no usable images: {empty}"
            + (f"; {len(skipped)} file(s) skipped, e.g. {skipped[0][0]}: {skipped[0][1]}"
               if skipped else "")
        )
    return ImageFolderIndex(root=root, classes=classes, train=train, val=val, skipped=skipped)


def _collect(
    class_root: Path, classes: list[str], root: Path, skipped: list[tuple[str, str]],
    check_images: bool,
) -> list[Sample]:
    candidates: list[Sample] = []
    for label, name in enumerate(classes):
        class_dir = class_root / name
        if not class_dir.is_dir():
            continue
        for path in _class_files(class_dir):
            if is_image_name(path):
                candidates.append(Sample(path, label))
            else:
                skipped.append((str(path.relative_to(root)), "not an image file"))
    if not check_images:
        return candidates
    # Decoding releases the GIL, so threads check several files at once.
    with ThreadPoolExecutor(max_workers=8) as pool:
        reasons = list(pool.map(lambda s: check_decodable(s.path), candidates))
    good = []
    for sample, reason in zip(candidates, reasons, strict=True):
        if reason is None:
            good.append(sample)
        else:
            skipped.append((str(sample.path.relative_to(root)), reason))
    return good
