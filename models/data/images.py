"""Open image files safely and decode them into RGB, whatever mode they were saved in.

Every decode goes through ``open_checked``: only the formats we document are tried, and the
pixel count is read from the header and checked before a single pixel is decoded, so a small
file that would decode to gigabytes (a decompression bomb) costs nothing; in ftune's own
processes PIL's warning for big images is an error too (``pil_limits.py``). JPEGs are decoded
at a reduced DCT scale when the result will be downscaled anyway (``decode_for``), which is
several times faster and smaller.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import IO

from PIL import Image, ImageOps

from ftune.models.settings import engine_settings

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# The formats the README documents. JPEG includes MPO, the variant many phone cameras write
# (PIL opens it through the JPEG plugin and calls it "MPO").
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
READABLE = "JPEG, PNG, BMP, GIF, WebP or TIFF"


class ImageRefused(ValueError):
    """A file that is not an image we read, or one too large to decode."""


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def open_checked(source: str | Path | IO[bytes], max_pixels: int | None = None) -> Image.Image:
    """The image, opened (header read, nothing decoded) and checked; the caller closes it."""
    limit = max_pixels or engine_settings().max_image_pixels
    if limit > (Image.MAX_IMAGE_PIXELS or 0):
        Image.MAX_IMAGE_PIXELS = limit  # PIL's backstop never refuses below our own limit
    try:
        image = Image.open(source, formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL's own check (configure makes its warning an error) fires first for images far
        # over the limit; its limit is never below ours, so name ours, the one users set.
        raise ImageRefused(f"too many pixels (more than {limit}); downscale it") from None
    width, height = image.size
    if width * height > limit:
        image.close()
        raise ImageRefused(f"too many pixels ({width}×{height} > {limit}); downscale it")
    return image


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


def open_rgb(source: str | Path | IO[bytes], max_pixels: int | None = None) -> Image.Image:
    """The whole image, decoded to RGB (first frame of GIF and TIFF stacks)."""
    with open_checked(source, max_pixels) as image:
        image.seek(0)
        return to_rgb(image)


def decode_for(source: str | Path | IO[bytes], short_side: int,
               max_pixels: int | None = None) -> Image.Image:
    """RGB decoded at no less than twice ``short_side`` on its shorter side, the size it will
    be resized to: a JPEG then decodes at a reduced DCT scale (1/2 to 1/8)."""
    with open_checked(source, max_pixels) as image:
        image.seek(0)
        width, height = image.size
        if image.format in ("JPEG", "MPO") and min(width, height) > 2 * short_side:
            scale = 2 * short_side / min(width, height)
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        return to_rgb(image)
