"""Decode uploaded images one by one (so a bad one is named) and classify them."""

from __future__ import annotations

from PIL import Image, UnidentifiedImageError

from ftune.models.data.images import open_rgb
from ftune.service.errors import InvalidInput
from ftune.service.ingest.multipart import ReceivedFile

MAX_TOP_K = 1000


def parse_top_k(raw: str | int | None) -> int:
    if raw is None or raw == "":
        return 5
    try:
        value = int(raw)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"top_k: must be an integer, got {raw!r}") from exc
    if not 1 <= value <= MAX_TOP_K:
        raise InvalidInput(f"top_k: must be between 1 and {MAX_TOP_K}, got {value}")
    return value


def decode_images(files: list[ReceivedFile]) -> list[Image.Image]:
    images = []
    for received in files:
        if received.size == 0:
            raise InvalidInput(f"{received.filename}: the file is empty")
        try:
            images.append(open_rgb(received.path))
        except Image.DecompressionBombError as exc:
            raise InvalidInput(f"{received.filename}: too many pixels ({exc})") from exc
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise InvalidInput(f"{received.filename}: not a decodable image "
                               f"({type(exc).__name__}: {exc})") from exc
    return images
