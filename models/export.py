"""Export a tuned model as TorchScript or ONNX with its preprocessing inside.

Input: ``images``, uint8, shape ``[N, 3, S, S]`` (RGB, channels first), S the model's
``input_size`` from config.json. Output: ``probabilities``, float32 ``[N, num_classes]``, in
the order of config.json's ``classes``: calibrated (the model's temperature is inside), a
softmax for a single-label model, each class's sigmoid for a multi-label one (a class is
present when its probability reaches its threshold, in the metadata's ``thresholds``).
Normalisation is inside the exported graph; resizing is not. Resize as ``Predictor`` does
(shorter side to ``resize_size``, centre crop S × S)::

    import json, math
    import numpy as np, onnxruntime as ort
    from PIL import Image
    prep = json.load(open("config.json"))["preprocessing"]
    S = prep["input_size"]
    short = math.floor(S / prep["crop_pct"])                 # Preprocessing.resize_size
    image = Image.open("photo.jpg").convert("RGB")
    w, h = image.size                                        # as torchvision's resize does:
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    filters = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
    image = image.resize(size, filters[prep["interpolation"]])
    left = int(round((image.width - S) / 2.0))               # torchvision's center_crop
    top = int(round((image.height - S) / 2.0))
    batch = np.asarray(image.crop((left, top, left + S, top + S))).transpose(2, 0, 1)[None]
    probabilities = ort.InferenceSession("model.onnx").run(None, {"images": batch})[0]

For exact parity with ``/predict``, use ``models.Predictor.to_uint8`` where torchvision is
available. Each file carries this description (``description``): ONNX ``metadata_props`` and
the TorchScript extra file ``ftune.json``; the README shows the recipe reading it.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from pathlib import Path

import torch
from torch import nn

from ftune.models.export_formats import TRACED_FORMATS
from ftune.models.predictor import Predictor
from ftune.models.preprocessing import Preprocessing

EXTRA_FILE = "ftune.json"  # in a TorchScript file: the description below
ONNX_OPSET = 17


class ExportedClassifier(nn.Module):
    """uint8 RGB images in, class probabilities out; the same arithmetic as ``Predictor``."""

    shift: torch.Tensor  # buffers, registered below (so they travel with the model)
    scale: torch.Tensor
    inverse_temperature: torch.Tensor

    def __init__(self, model: nn.Module, prep: Preprocessing, *, multi_label: bool = False,
                 temperature: list[float] | None = None) -> None:
        super().__init__()
        self.model, self.multi_label = model, multi_label
        mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
        std = torch.tensor(prep.std).view(1, 3, 1, 1)
        self.register_buffer("shift", -mean / std)
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("inverse_temperature",
                             1.0 / torch.tensor(temperature or [1.0]).view(1, -1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        normalised = torch.addcmul(self.shift, images.float(), self.scale)
        logits = self.model(normalised).float() * self.inverse_temperature
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)


def description(predictor: Predictor) -> dict[str, str]:
    """What an exported file needs to be used alone: its classes and how to feed it. Every
    value is a string (ONNX metadata holds strings); lists and numbers are JSON."""
    prep = predictor.preprocessing
    output = ("float32 [N, len(classes)]: each class's calibrated probability (a sigmoid), "
              "in the order of classes; a class is present when it reaches its threshold"
              if predictor.multi_label else "float32 calibrated class probabilities "
              "[N, len(classes)] (a softmax), in the order of classes")
    return {
        "classes": json.dumps(predictor.classes),
        "task": predictor.task.name,
        "temperature": json.dumps(predictor.temperature),
        "thresholds": json.dumps(predictor.thresholds.tolist() if predictor.multi_label
                                 else None),
        "input": "uint8 RGB [N, 3, S, S], S = input_size; normalisation is inside the model",
        "output": output,
        "input_size": str(prep.input_size),
        "resize": (f"shorter side to {prep.resize_size} px ({prep.interpolation}), then a "
                   f"centre crop of {prep.input_size} x {prep.input_size}"),
        "resize_size": str(prep.resize_size),
        "interpolation": prep.interpolation,
        "mean": json.dumps(list(prep.mean)),
        "std": json.dumps(list(prep.std)),
        "backbone": str(predictor.config.get("backbone", "")),
        "producer": "ftune",
    }


def _describe_onnx(path: Path, described: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    for key, value in described.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(model, str(path))


def export_model(model_dir: str | Path, out: str | Path, fmt: str, *,
                 name: str = "model") -> Path:
    """Write ``out`` atomically (temporary file, then rename); returns its path. ``name``
    names the model in a Triton repository."""
    if fmt not in TRACED_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of "
                         f"{', '.join(TRACED_FORMATS)}")
    predictor = Predictor.load(model_dir, device="cpu")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}")
    onnx_tmp = tmp.with_name(tmp.name + ".onnx")
    try:
        if fmt == "torchscript":
            _torchscript(predictor, tmp)
        elif fmt == "onnx":
            write_onnx(predictor, tmp)
        else:  # triton: a repository around the ONNX export
            from ftune.models.triton import write_repository

            write_repository(write_onnx(predictor, onnx_tmp), predictor.classes, name, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        onnx_tmp.unlink(missing_ok=True)
    return out


def _wrapped(predictor: Predictor) -> tuple[ExportedClassifier, torch.Tensor]:
    wrapper = ExportedClassifier(predictor.model, predictor.preprocessing,
                                 multi_label=predictor.multi_label,
                                 temperature=predictor.temperature).eval()
    size = predictor.preprocessing.input_size
    return wrapper, torch.zeros(2, 3, size, size, dtype=torch.uint8)


def _torchscript(predictor: Predictor, path: Path) -> Path:
    wrapper, example = _wrapped(predictor)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about constants
        torch.jit.save(torch.jit.trace(wrapper, example), str(path),
                       _extra_files={EXTRA_FILE: json.dumps(description(predictor), indent=2)})
    return path


def write_onnx(predictor: Predictor, path: Path) -> Path:
    """The ONNX export of a loaded model at ``path`` (not atomic: its callers make it so)."""
    wrapper, example = _wrapped(predictor)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about constants
        torch.onnx.export(wrapper, (example,), str(path), input_names=["images"],
                          output_names=["probabilities"],
                          dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}},
                          opset_version=ONNX_OPSET, dynamo=False)
    _describe_onnx(path, description(predictor))
    return path
