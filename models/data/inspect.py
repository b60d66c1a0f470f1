"""Per-file facts for a dataset check: content hash, pixel size, and whether it decodes.

The pixel count is read from the header and checked before anything is decoded, so a
decompression bomb costs nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from PIL import UnidentifiedImageError

from ftune.models.data.images import READABLE, ImageRefused, open_checked
from ftune.models.settings import engine_settings


@dataclass(frozen=True)
class FileFacts:
    sha256: str | None
    width: int = 0
    height: int = 0
    error: str | None = None  # why the file cannot be used; None when it can


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def inspect_image(path: Path, max_pixels: int | None = None) -> FileFacts:
    limit = max_pixels or engine_settings().max_image_pixels
    try:
        digest = file_sha256(path)
    except OSError as exc:
        return FileFacts(None, error=f"cannot read: {exc.strerror or exc}")
    try:
        with open_checked(path, limit) as image:
            width, height = image.size
            if image.format == "JPEG":
                image.draft("RGB", (64, 64))  # decode at reduced scale: still reads every byte
            image.load()
    except ImageRefused as exc:
        return FileFacts(digest, error=str(exc))
    except UnidentifiedImageError:
        return FileFacts(digest, error=f"cannot decode: not a {READABLE} file")
    except MemoryError:
        raise  # the checker's memory limit, not a damaged file: the upload is refused
    except Exception as exc:  # PIL raises many types for damaged files
        return FileFacts(digest, error=f"cannot decode: {type(exc).__name__}: {exc}")
    return FileFacts(digest, width, height)
