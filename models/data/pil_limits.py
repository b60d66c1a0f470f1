"""PIL's own decompression-bomb check, made strict for a whole ftune process.

``open_checked`` (``images.py``) checks every image the engine opens against its own limit,
from the header, before decoding. This is the backstop for anything else in the process that
opens images through PIL: past the limit, PIL's warning becomes an error. It changes
process-wide state (PIL's limit and the warnings filters), so it runs in the explicit
configure step (``ftune.models.settings.configure``, which ftune's commands, API, workers and
sandbox child call at start), never at import: a library user's process stays theirs.
"""

from __future__ import annotations

import warnings


def refuse_images_over(max_pixels: int) -> None:
    """PIL refuses, with an error, to open an image of more than ``max_pixels``."""
    # Imported here: the settings module calls this, and the API reads settings at start
    # without needing PIL for it.
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)
