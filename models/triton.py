"""A Triton Inference Server model repository holding a tuned model's ONNX export.

The zip unpacks to one repository with one model::

    <name>/config.pbtxt      platform onnxruntime_onnx, dynamic batching, the I/O below
    <name>/1/model.onnx      the ONNX export (models/export.py): uint8 images in, calibrated
                             probabilities out, normalisation inside
    <name>/labels.txt        the classes, one per line, in output order (Triton's
                             classification extension reads it)

Serve it with ``docker run --rm -p 8000:8000 -v $PWD/repo:/models
nvcr.io/nvidia/tritonserver:<release>-py3 tritonserver --model-repository=/models`` after
unzipping into ``repo/``. Names, shapes and types here are read from the ONNX file itself, so
the config cannot drift from the model it describes.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

MAX_BATCH = 32  # what /predict's dynamic batching gathers at most
QUEUE_DELAY_US = 5000  # as FTUNE's own batcher waits (5 ms) for peers
FILE_MODE = 0o100644  # every file rw-r--r--, as the other downloads

# ONNX tensor element types -> Triton's data types (those an exported model can carry).
_TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 6: "TYPE_INT32",
                 7: "TYPE_INT64", 10: "TYPE_FP16", 11: "TYPE_FP64"}


def repository_name(name: str) -> str:
    """A Triton model name from the model's: letters, digits, ``_``, ``-`` and ``.``."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._-")
    return cleaned or "model"


def _tensor(value_info: Any) -> tuple[str, str, list[int]]:  # onnx's ValueInfoProto
    """(name, Triton type, dims without the batch dimension)."""
    kind = value_info.type.tensor_type
    dims = [d.dim_value for d in kind.shape.dim][1:]
    return value_info.name, _TRITON_TYPES[kind.elem_type], dims


def config_text(name: str, onnx_path: Path, max_batch: int = MAX_BATCH) -> str:
    """config.pbtxt for the ONNX model at ``onnx_path`` (its first input and output)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    (in_name, in_type, in_dims), = [_tensor(v) for v in graph.input[:1]]
    (out_name, out_type, out_dims), = [_tensor(v) for v in graph.output[:1]]
    return "\n".join([
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch}",
        "input [",
        f'  {{ name: "{in_name}", data_type: {in_type}, dims: {in_dims} }}',
        "]",
        "output [",
        f'  {{ name: "{out_name}", data_type: {out_type}, dims: {out_dims}, '
        'label_filename: "labels.txt" }',
        "]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {QUEUE_DELAY_US} }}",
        'instance_group [ { kind: KIND_AUTO } ]',
        "",
    ])


def write_repository(onnx_path: Path, classes: list[str], name: str, out: Path) -> Path:
    """The repository as a zip at ``out`` (the caller makes it atomic)."""
    model = repository_name(name)
    files = {f"{model}/config.pbtxt": config_text(model, onnx_path).encode(),
             f"{model}/labels.txt": "".join(f"{c}\n" for c in classes).encode()}
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for arcname, data in files.items():
            entry = zipfile.ZipInfo(arcname)
            entry.external_attr = FILE_MODE << 16
            archive.writestr(entry, data)
        entry = zipfile.ZipInfo(f"{model}/1/model.onnx")
        entry.external_attr = FILE_MODE << 16
        entry.compress_type = zipfile.ZIP_STORED  # dense floats: as small, faster
        with open(onnx_path, "rb") as source, archive.open(entry, "w") as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)
    return out
