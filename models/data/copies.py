"""Which unlabelled images count: one of each content, none that copy a labelled image.

Shared by lint (which reports the copies) and discovery (which leaves them out)."""

from __future__ import annotations

from collections.abc import Sequence


def kept_indices(hashes: Sequence[str | None], labelled: set[str]) -> list[int]:
    """Positions of the images kept: a copy of a training image adds nothing, and one of a
    val or test image would let pretraining see held-out images. An image without a hash
    (unreadable bytes) is kept: it cannot be compared, and decoding decides later."""
    seen: set[str] = set()
    kept = []
    for position, sha in enumerate(hashes):
        if sha in labelled or (sha and sha in seen):
            continue
        if sha:
            seen.add(sha)
        kept.append(position)
    return kept
