"""Static int8 quantization of an ONNX export with ONNX Runtime's tools: per-channel int8
weights, uint8 activations whose ranges are calibrated on the model's own training images,
QDQ format (what ONNX Runtime fuses into integer kernels on CPUs, and TensorRT reads).

Only the layers that carry the arithmetic (Conv, Gemm, MatMul) and the activations after them
(Clip, Relu) are quantized: the input's normalisation, the temperature and the final softmax
or sigmoid stay in float, so the probabilities keep their resolution. The activations must be
in the list: the quantizer then folds each into the Conv before it and gives the Conv's output
the activation's range (ReLU6's [0, 6]); left out, the Conv's output is quantized over its
whole pre-activation range, and most of its 256 steps fall where ReLU6 cuts. Measured on
lite0 tuned on animal-mnist (1,000 test images): without them accuracy fell 5.9 points and
91.2% of answers stayed the same; with them 0.1 points and 98.5%."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "Clip", "Relu"]
CALIBRATION_BATCH = 16


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray) -> Path:
    """Write the int8 model for the fp32 ONNX file ``fp32`` to ``out``; ``calibration``:
    uint8 ``[N, 3, S, S]`` images (the model's input)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = iter(
                calibration[i:i + CALIBRATION_BATCH]
                for i in range(0, len(calibration), CALIBRATION_BATCH))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: np.ascontiguousarray(batch)}

    scratch = Path(tempfile.mkdtemp(prefix="ftune-int8-", dir=out.parent))
    try:
        prepared = scratch / "prepared.onnx"
        # Shape inference and graph clean-up first, as ONNX Runtime's docs advise.
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), Batches(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8, op_types_to_quantize=QUANTIZED_OPS,
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _copy_description(fp32, out)
    return out


def _copy_description(source: Path, target: Path) -> None:
    """The export's description (classes, preprocessing: models/export.py) on the int8 file."""
    import onnx

    described = {p.key: p.value for p in onnx.load(str(source)).metadata_props}
    model = onnx.load(str(target))
    del model.metadata_props[:]
    for key, value in {**described, "precision": "int8"}.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(model, str(target))
