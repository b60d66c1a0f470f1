"""The serving engines and the bounds that decide which one serves a model (no torch).

``FTUNE_SERVE_ENGINE`` picks the policy for every model an API process serves:

- ``torch``: eager PyTorch, channels-last, inference mode (the reference).
- ``onnxruntime``: the model's ONNX export in ONNX Runtime, always; a model whose export
  fails its parity check is refused (503 naming why) instead of served by another engine.
- ``auto`` (default): ONNX Runtime once the export has passed its parity check against the
  torch model on the model's own images; torch until then and where it fails (with why).
- ``int8``: as ``auto``, but the int8 model where it was offered (its guard passed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ServePolicy = Literal["auto", "torch", "onnxruntime", "int8"]
SERVE_POLICIES: tuple[str, ...] = ("auto", "torch", "onnxruntime", "int8")

# What runs a forward: the names /metrics and the model's view report.
TORCH, ONNXRUNTIME, ONNXRUNTIME_INT8 = "torch", "onnxruntime", "onnxruntime-int8"

# fp32 ONNX against torch, on up to PARITY_IMAGES of the model's own images: the same
# computation in another runtime, so only float rounding may differ.
PARITY_IMAGES = 64
PARITY_MIN_AGREEMENT = 1.0  # every image's top class (multi-label: label set) the same
PARITY_MAX_PROB_DIFF = 1e-3  # largest difference of any probability

# int8 against the fp32 model, on up to INT8_CHECK_IMAGES test images: offered only where it
# keeps nearly every answer and the accuracy (multi-label: mAP) within half a point.
INT8_CHECK_IMAGES = 1000
INT8_CALIBRATION_IMAGES = 128  # training images that set the activations' ranges
INT8_MIN_AGREEMENT = 0.99
INT8_MAX_DROP = 0.005

# The files of a model's serving preparation (models/serving/prepare.py).
REPORT_FILE, FP32_FILE, INT8_FILE = "serving.json", "model.onnx", "model.int8.onnx"


@dataclass(frozen=True)
class Choice:
    engine: str | None  # TORCH, ONNXRUNTIME or ONNXRUNTIME_INT8; None: refused
    file: str | None  # the ONNX file ONNX Runtime loads
    why: str
    batch: dict | None = None  # the batch size measured fastest for that file (prepare.py)


def choose(policy: str, report: dict | None) -> Choice:
    """The engine ``policy`` gives a model whose preparation reported ``report`` (None: not
    prepared yet). The one place the API's loads and its model views decide."""
    if policy == "torch":
        return Choice(TORCH, None, "FTUNE_SERVE_ENGINE=torch")
    if report is None:
        return Choice(TORCH, None, "ONNX Runtime's files are prepared and checked on the "
                      "model's first prediction; torch serves until they pass")
    onnx, int8 = report.get("onnx") or {}, report.get("int8") or {}
    if not onnx.get("passed"):
        why = f"the ONNX export failed its parity check: {onnx.get('why')}"
        return Choice(None if policy == "onnxruntime" else TORCH, None, why)
    if policy == "int8":
        if int8.get("offered"):
            return Choice(ONNXRUNTIME_INT8, INT8_FILE, f"int8 offered: {int8.get('why')}",
                          int8.get("batch"))
        return Choice(ONNXRUNTIME, FP32_FILE, f"int8 not offered: {int8.get('why')}",
                      onnx.get("batch"))
    return Choice(ONNXRUNTIME, FP32_FILE, f"parity passed: {onnx.get('why')}",
                  onnx.get("batch"))
