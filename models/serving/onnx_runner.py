"""An ONNX export (models/export.py: uint8 NCHW images in, calibrated probabilities out) run
by ONNX Runtime, with threads that do not fight the rest of the process."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ftune.models.serving.lanes import LaneLayout, host_cores

if TYPE_CHECKING:  # ONNX Runtime loads with the first ONNX model, never with its importers
    import onnxruntime as ort


def execution_providers(device: str) -> list[str]:
    """TensorRT, then CUDA, where the model is served on a GPU and the installed onnxruntime
    has them; the CPU always last (ONNX Runtime falls back to it op by op)."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    wanted = (["TensorrtExecutionProvider", "CUDAExecutionProvider"]
              if device.startswith("cuda") else [])
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


class OnnxRunner:
    """The model in ONNX Runtime: a session per thread count it is run with (``threads``:
    one count or several, the first the default; default: every core, as torch). Each
    session's intra-op pool sleeps between runs instead of spinning, so it steals no core
    from the API's event loop or from another forward. Sessions may run at once from
    several threads (lanes.py)."""

    def __init__(self, path: str | Path, *, threads: int | tuple[int, ...] | None = None,
                 device: str = "cpu") -> None:
        widths = (threads,) if isinstance(threads, int) else threads or (host_cores(),)
        self.path = Path(path)
        self.sessions = {width: _session(self.path, width, device) for width in widths}
        self.default = widths[0]
        session = self.sessions[self.default]
        self.input = session.get_inputs()[0].name
        self.providers: list[str] = session.get_providers()

    def batch_size(self, measured: dict | None, layout: LaneLayout) -> int | None:
        """The size measured fastest (models/serving/batch_size.py), where it was measured
        with this session's execution provider and ``layout``'s lanes; None otherwise (the
        batcher's own limit)."""
        if measured is None or measured.get("provider") != self.providers[0]:
            return None
        if any(measured.get(key) != value for key, value in layout.describe().items()):
            return None
        return int(measured["size"])

    def __call__(self, images: np.ndarray, threads: int | None = None) -> np.ndarray:
        """float32 ``[N, C]`` probabilities for uint8 ``[N, 3, S, S]`` images, by the session
        of ``threads`` (None: the default one)."""
        session = self.sessions[self.default if threads is None else threads]
        batch = np.ascontiguousarray(images, dtype=np.uint8)
        return np.asarray(session.run(None, {self.input: batch})[0], dtype=np.float32)

    def memory_bytes(self) -> int:
        """The model file's size per session: what their weights take in memory, about."""
        return self.path.stat().st_size * len(self.sessions)


def _session(path: Path, threads: int, device: str) -> ort.InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # warnings about unused initialisers are not ours
    # The CPU arena stays on: it keeps the largest batch's activations for the session's
    # life, but without it each run maps and faults in fresh memory (measured on lite0 at
    # 224 px: batch 16 at 90 against 135 images/s).
    return ort.InferenceSession(str(path), options, providers=execution_providers(device))
