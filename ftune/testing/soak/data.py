"""What the soak's tenants upload and send: a tiny real dataset (good, and the same bytes again
for the duplicate path), a corpus of hostile archives (each must be a 4xx), and an image to
predict on."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from ftune.testing.archives import (
    tar_folder,
    tar_gz_bomb,
    tar_with,
    zip_bomb,
    zip_folder,
    zip_members,
)
from ftune.testing.realdata import animal_mnist_arrays, balanced_indices, write_image_folder


@dataclass(frozen=True)
class SoakData:
    good: bytes  # a zip of 3 classes × 12 images
    variants: tuple[bytes, ...]  # other good datasets (different content: new rows)
    hostile: dict[str, bytes]
    image: bytes  # a PNG to predict on


def build_data(work: Path) -> SoakData:
    images, labels = animal_mnist_arrays()
    folders = [write_image_folder(work / f"data-{offset}", images[idx], labels[idx])
               for offset in (0, 12, 24)
               for idx in [balanced_indices(labels, 12, offset=offset, classes=3)]]
    good, *others = folders
    return SoakData(good=zip_folder(good), variants=tuple(zip_folder(f) for f in others),
                    hostile=hostile_corpus(good),
                    image=next(good.rglob("*.png")).read_bytes())


def hostile_corpus(folder: Path) -> dict[str, bytes]:
    """Archives the API must refuse with a 4xx, never a 5xx, leaving nothing behind."""
    link = tarfile.TarInfo("cats/link.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    truncated = tar_folder(folder)
    return {
        "zip-slip": zip_members({"cats/ok.png": b"x", "../../../evil.png": b"evil"}),
        "tar-slip": tar_with([tarfile.TarInfo("a/../../../../evil.png")],
                             {"a/../../../../evil.png": b"evil"}),
        "absolute-zip": zip_members({"/tmp/evil.png": b"evil"}),
        "tar-symlink": tar_with([tarfile.TarInfo("cats/a.png"), link], {"cats/a.png": b"x"}),
        "zip-bomb": zip_bomb(),
        "tar-gz-bomb": tar_gz_bomb(),
        "not-an-archive": b"plainly not an archive" * 40,
        "empty": b"",
        "truncated-tar-gz": truncated[: len(truncated) // 2],
        "one-class": zip_members({"cats/a.png": b"x"}),
    }


