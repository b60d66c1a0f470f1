"""Decode image files into RGB, whatever mode they were saved in."""

from __future__ import annotations

from pathlib import Path
from typing import IO

from PIL import Image, ImageOps

from ftune.models.settings import DEFAULT_MAX_IMAGE_PIXELS

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Refuse decompression bombs before decoding (PIL checks this limit on open).
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with EXIF orientation applied; alpha composited on white, 16-bit scaled down."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping everything to white.
        image = image.point(lambda v: v * (1 / 256)).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def open_rgb(source: str | Path | IO[bytes]) -> Image.Image:
    with Image.open(source) as image:
        image.seek(0)  # first frame of GIF/TIFF stacks
        return to_rgb(image)
