"""An ONNX export (models/export.py: uint8 NCHW images in, calibrated probabilities out) run
by ONNX Runtime, with threads that do not fight the rest of the process."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def execution_providers(device: str) -> list[str]:
    """TensorRT, then CUDA, where the model is served on a GPU and the installed onnxruntime
    has them; the CPU always last (ONNX Runtime falls back to it op by op)."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    wanted = (["TensorrtExecutionProvider", "CUDAExecutionProvider"]
              if device.startswith("cuda") else [])
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


class OnnxRunner:
    """One ONNX Runtime session. ``threads``: its intra-op pool (the cores torch would use);
    the pool sleeps between runs instead of spinning, so it steals no core from the API's
    event loop or from another model's forward."""

    def __init__(self, path: str | Path, *, threads: int | None = None,
                 device: str = "cpu") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or max(1, len(os.sched_getaffinity(0)))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # warnings about unused initialisers are not ours
        # The CPU arena stays on: it keeps the largest batch's activations for the session's
        # life, but without it each run maps and faults in fresh memory (measured on lite0 at
        # 224 px: batch 16 at 90 against 135 images/s).
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options,
                                            providers=execution_providers(device))
        self.input = self.session.get_inputs()[0].name
        self.providers: list[str] = self.session.get_providers()

    def batch_size(self, measured: dict | None) -> int | None:
        """The size measured fastest (models/serving/batch_size.py), where it was measured
        with this session's execution provider; None otherwise (whole batches)."""
        return (int(measured["size"]) if measured is not None
                and measured.get("provider") == self.providers[0] else None)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """float32 ``[N, C]`` probabilities for uint8 ``[N, 3, S, S]`` images."""
        batch = np.ascontiguousarray(images, dtype=np.uint8)
        return np.asarray(self.session.run(None, {self.input: batch})[0], dtype=np.float32)

    def memory_bytes(self) -> int:
        """The model file's size: what its weights take in memory, about."""
        return self.path.stat().st_size
