"""The formats a tuned model is downloaded in, and the file each is kept in (no torch import).

One table for the engine (``ftune export``, ``ftune serving-check``), the API (the download
route, where exports are stored and found) and the tests. To add a format, add its name to
``ExportFormat`` and a row to ``EXPORT_FORMATS`` (tests/models/test_export_formats.py fails
when the two differ), then teach ``ftune.models.export.export_model`` to write it if it is
traced from the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ExportFormat = Literal["safetensors", "torchscript", "onnx", "triton", "onnx-int8"]
DEFAULT_FORMAT: ExportFormat = "safetensors"


@dataclass(frozen=True)
class FormatInfo:
    suffix: str  # of the file kept under the data directory's exports/ and downloaded
    media_type: str
    # Written by ``ftune export`` from the model; else the bundle zipped, or ``serving``.
    traced: bool
    # Made by the serving preparation (``ftune serving-check``: models/serving/prepare.py),
    # and offered only where its guard passed.
    serving: bool = False


EXPORT_FORMATS: dict[str, FormatInfo] = {
    # The bundle that Predictor.load reads (model.safetensors, config.json, ...), zipped.
    "safetensors": FormatInfo(".zip", "application/zip", traced=False),
    "torchscript": FormatInfo(".pt", "application/octet-stream", traced=True),
    "onnx": FormatInfo(".onnx", "application/octet-stream", traced=True),
    # A Triton Inference Server model repository around the ONNX export (models/triton.py).
    "triton": FormatInfo(".triton.zip", "application/zip", traced=True),
    # Statically quantized ONNX (models/serving/int8.py), where its accuracy guard passed.
    "onnx-int8": FormatInfo(".int8.onnx", "application/octet-stream", traced=False,
                            serving=True),
}

# What ``ftune export --format`` accepts.
TRACED_FORMATS = tuple(name for name, info in EXPORT_FORMATS.items() if info.traced)
EXPORT_SUFFIXES = tuple(info.suffix for info in EXPORT_FORMATS.values())


def export_suffix(fmt: str) -> str:
    """The file suffix of ``fmt``; an unknown format is a ValueError."""
    info = EXPORT_FORMATS.get(fmt)
    if info is None:
        raise ValueError(f"unknown export format {fmt!r}; choose one of "
                         f"{', '.join(EXPORT_FORMATS)}")
    return info.suffix
