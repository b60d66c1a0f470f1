"""Count the archive entries that can never be an image, and refuse archives made of them.

An empty file, a folder or a file named ``x.txt`` costs an uploader about a hundred bytes
(less in a tar.gz), but unpacking it and listing it afterwards costs the service about as much
as a real image: 200,000 of them took about 50 s to refuse. Such entries are told apart from
what the archive's own index says (a zip's central directory before anything is unpacked, a
tar's headers as they stream) and an archive holding more of them than ``allowance`` and more
than ``per_image`` for each entry that could be an image is refused. A real dataset with some
clutter (``.DS_Store``, ``__MACOSX`` copies, a README, a folder per class) stays far below.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftune.models.data.images import IMAGE_SUFFIXES
from ftune.models.data.layout import is_hidden
from ftune.models.errors import ArchiveError

# No file this small decodes in any format we read: the smallest we could make PIL decode are
# a 27-byte GIF and a 29-byte BMP (PNG needs 67 bytes, WebP about 30, JPEG and TIFF more).
MIN_IMAGE_BYTES = 24


@dataclass
class UnusableEntries:
    """What the entries seen so far are: possible images, and the kinds that cannot be."""

    allowance: int
    per_image: float
    images: int = 0  # regular files with an image name, not hidden, of MIN_IMAGE_BYTES or more
    folders: int = 0
    small: int = 0  # files with an image name under MIN_IMAGE_BYTES
    other: int = 0  # hidden files, names that are not images, links and special entries

    @property
    def unusable(self) -> int:
        return self.folders + self.small + self.other

    @property
    def total(self) -> int:
        return self.images + self.unusable

    def add(self, name: str, *, folder: bool, regular: bool, size: int) -> None:
        """Count one entry as its index describes it (``size``: its unpacked bytes)."""
        if folder:
            self.folders += 1
        elif not regular or not _could_be_image_name(name):
            self.other += 1
        elif size < MIN_IMAGE_BYTES:
            self.small += 1
        else:
            self.images += 1

    def too_many(self) -> bool:
        return self.unusable > max(self.allowance, self.per_image * self.images)

    def check(self, where: str, scope: str) -> None:
        """Refuse when too many entries cannot be images. ``scope`` says which entries were
        counted ("the archive's", "the first"), ``where`` how."""
        if self.too_many():
            raise ArchiveError(self.message(where, scope))

    def message(self, where: str, scope: str) -> str:
        return (f"{self.unusable} of {scope} {self.total} entries cannot be images: "
                f"{self.small} files under {MIN_IMAGE_BYTES} bytes (too small for any image), "
                f"{self.folders} folders, {self.other} hidden, non-image or special entries; "
                f"{self.images} can. At most {self.allowance} such entries are accepted, or "
                f"{self.per_image:g} for each entry that can be an image ({where}). Pack only "
                "the images (and labels.csv), without empty files")


def _could_be_image_name(name: str) -> bool:
    """Whether the dataset check would look at a file of this name: not hidden, with an
    image suffix. String operations, not pathlib: called for every entry of an archive."""
    parts = [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]
    if not parts or any(is_hidden(part) for part in parts):
        return False
    stem, dot, suffix = parts[-1].rpartition(".")
    return bool(stem and dot) and f".{suffix.lower()}" in IMAGE_SUFFIXES
