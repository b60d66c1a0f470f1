"""Decode uploaded images one by one (so a bad one is named) and classify them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from ftune.models.data.images import READABLE, ImageRefused, decode_for
from ftune.service.errors import InvalidInput
from ftune.service.ingest.multipart import ReceivedFile

if TYPE_CHECKING:
    from ftune.models.predictor import Predictor

MAX_TOP_K = 1000


def parse_top_k(raw: str | int | None) -> int | None:
    """None when not given: the model's default (5 labels; multi-label, every class)."""
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"top_k: must be an integer, got {raw!r}") from exc
    if not 1 <= value <= MAX_TOP_K:
        raise InvalidInput(f"top_k: must be between 1 and {MAX_TOP_K}, got {value}")
    return value


def decode_batch(files: list[ReceivedFile], predictor: Predictor,
                 max_pixels: int) -> np.ndarray:
    """uint8 ``[N, S, S, 3]`` arrays for the model, decoded and resized one image at a time
    (never every full-size image at once); a bad file is a 422 naming it (the client's name
    for it, never where the server keeps it)."""
    arrays = []
    for received in files:
        if received.size == 0:
            raise InvalidInput(f"{received.filename}: the file is empty")
        try:
            image = decode_for(received.source(), predictor.preprocessing.resize_size, max_pixels)
        except ImageRefused as exc:
            raise InvalidInput(f"{received.filename}: {exc}") from None
        except UnidentifiedImageError:
            raise InvalidInput(f"{received.filename}: not a {READABLE} image") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise InvalidInput(f"{received.filename}: the image is damaged and cannot be "
                               f"decoded ({type(exc).__name__})") from None
        arrays.append(predictor.to_arrays([image])[0])
        image.close()
    return np.stack(arrays)
