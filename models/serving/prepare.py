"""The one-off work that lets a model be served by ONNX Runtime: its fp32 export checked
against the torch model, and an int8 model offered only where its guard passes.

``prepare_serving`` writes into a folder: ``model.onnx``, ``model.int8.onnx`` (only when
offered) and ``serving.json``, the figures and the reasons::

    {"onnx": {"passed": bool, "why": str, "images": n, "agreement": a, "max_prob_diff": d,
              "batch": {"size": n, "provider": p, "images_per_s": {"1": r, ...}}},
     "int8": {"offered": bool, "why": str, "images": n, "agreement": a,
              "quality": q, "fp32_quality": q32, "metric": "accuracy" | "mAP", "batch": ...}}

``batch`` (where the engine may serve): the batch size it runs fastest at on this host, in
its serving lanes (lanes.py, batch_size.py); the batcher gathers at most that many images
into one forward.

The images are the model's own: its dataset's test split, else its val split (the dataset's
own, or carved from train exactly as training carved it); int8's ranges are calibrated on
training images outside those. Without the dataset there is nothing honest to check on, and
neither engine is offered.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ftune.models.data.discover import Sample, scan_image_folder
from ftune.models.export import write_onnx
from ftune.models.predictor import Predictor
from ftune.models.serving.agreement import Agreement, agreement, quality
from ftune.models.serving.batch_size import measure_batch_sizes
from ftune.models.serving.engines import (
    FP32_FILE,
    INT8_CALIBRATION_IMAGES,
    INT8_CHECK_IMAGES,
    INT8_FILE,
    INT8_MAX_DROP,
    INT8_MIN_AGREEMENT,
    PARITY_IMAGES,
    PARITY_MAX_PROB_DIFF,
    PARITY_MIN_AGREEMENT,
    REPORT_FILE,
)
from ftune.models.serving.int8 import quantize_int8
from ftune.models.serving.lanes import LaneLayout, lane_layout
from ftune.models.serving.onnx_runner import OnnxRunner
from ftune.models.spec import FineTuneSpec
from ftune.models.tasks import TASKS

DECODE_CHUNK = 64  # images decoded at once: memory stays flat on large test splits


def prepare_serving(bundle: Path, data: Path | None, out: Path, lanes: int = 0) -> dict:
    """``lanes``: the serving lanes the batch size is measured in (lanes.py)."""
    out.mkdir(parents=True, exist_ok=True)
    predictor = Predictor.load(bundle, device="cpu")
    write_onnx(predictor, out / FP32_FILE)
    checked, calibration, where = _images(predictor, data)
    if not checked:
        why = f"no images to check the ONNX export on ({where})"
        report = {"onnx": {"passed": False, "why": why},
                  "int8": {"offered": False, "why": why}}
    else:
        runner = OnnxRunner(out / FP32_FILE)
        report = {"onnx": _parity(predictor, runner, _spread(checked, PARITY_IMAGES), where)}
        report["int8"] = (_int8(predictor, runner, checked, calibration, out, where)
                          if report["onnx"]["passed"] else
                          {"offered": False, "why": "the fp32 ONNX export failed its parity "
                           "check, so int8 (made from it) is not offered"})
        _measure_batch(report, out, _uint8(predictor, checked[:1]), lane_layout("cpu", lanes))
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def _measure_batch(report: dict, out: Path, image: np.ndarray, layout: LaneLayout) -> None:
    """Each engine that may serve gets the batch size it runs fastest at here."""
    files = {"onnx": FP32_FILE if report["onnx"]["passed"] else None,
             "int8": INT8_FILE if report["int8"]["offered"] else None}
    for name, file in files.items():
        if file is not None:
            runner = OnnxRunner(out / file, threads=layout.threads)
            report[name]["batch"] = measure_batch_sizes(runner, image, runner.providers[0],
                                                        layout)


def parity_passes(found: Agreement) -> bool:
    return (found.agreement >= PARITY_MIN_AGREEMENT
            and found.max_prob_diff <= PARITY_MAX_PROB_DIFF)


def int8_passes(found: Agreement, drop: float) -> bool:
    """``drop``: fp32's accuracy (or mAP) less int8's."""
    return found.agreement >= INT8_MIN_AGREEMENT and drop <= INT8_MAX_DROP


def _images(predictor: Predictor, data: Path | None
            ) -> tuple[list[Sample], list[Sample], str]:
    """(images to check on, training images to calibrate on, which split was checked)."""
    if data is None or not data.is_dir():
        return [], [], "the model's dataset is no longer stored"
    index = scan_image_folder(data, check_images=False)
    if index.test:
        return index.test, _spread(index.train, INT8_CALIBRATION_IMAGES), "test split"
    spec = FineTuneSpec.model_validate(predictor.config["spec"])
    if index.val is not None:
        return index.val, _spread(index.train, INT8_CALIBRATION_IMAGES), "val split"
    train_idx, val_idx = predictor.task.split(index.train, spec.val_fraction, spec.seed)
    train = [index.train[i] for i in train_idx]
    return ([index.train[i] for i in val_idx], _spread(train, INT8_CALIBRATION_IMAGES),
            "val split (carved from train as training carved it)")


def _spread(samples: Sequence[Sample], count: int) -> list[Sample]:
    """``count`` samples spread over the list (so over classes, which come in order)."""
    if len(samples) <= count:
        return list(samples)
    return [samples[i] for i in np.linspace(0, len(samples) - 1, count).astype(int)]


def _uint8(predictor: Predictor, samples: Sequence[Sample]) -> np.ndarray:
    return np.concatenate([predictor.to_uint8([s.path for s in samples[i:i + DECODE_CHUNK]])
                           .numpy() for i in range(0, len(samples), DECODE_CHUNK)])


def _thresholds(predictor: Predictor) -> np.ndarray | None:
    return predictor.thresholds.numpy() if predictor.multi_label else None


def _parity(predictor: Predictor, runner: OnnxRunner, samples: list[Sample],
            where: str) -> dict:
    batch = _uint8(predictor, samples)
    found = agreement(predictor.probabilities(torch.from_numpy(batch)).numpy(), runner(batch),
                      _thresholds(predictor))
    passed = parity_passes(found)
    answer = "label set" if predictor.multi_label else "top class"
    why = (f"on {found.images} images of the {where}: the same {answer} on "
           f"{found.agreement:.1%} (bound {PARITY_MIN_AGREEMENT:.0%}), largest probability "
           f"difference {found.max_prob_diff:.1e} (bound {PARITY_MAX_PROB_DIFF:.0e})")
    return {"passed": passed, "why": why, **found.to_dict()}


def _int8(predictor: Predictor, runner: OnnxRunner, checked: list[Sample],
          calibration: list[Sample], out: Path, where: str) -> dict:
    samples = _spread(checked, INT8_CHECK_IMAGES)
    quantize_int8(out / FP32_FILE, out / INT8_FILE, _uint8(predictor, calibration))
    int8 = OnnxRunner(out / INT8_FILE)
    fp32_probs, int8_probs = [], []
    for i in range(0, len(samples), DECODE_CHUNK):
        batch = _uint8(predictor, samples[i:i + DECODE_CHUNK])
        fp32_probs.append(runner(batch))
        int8_probs.append(int8(batch))
    fp32_all, int8_all = np.concatenate(fp32_probs), np.concatenate(int8_probs)
    targets = TASKS[predictor.task.name].targets(samples, len(predictor.classes)).numpy()
    found = agreement(fp32_all, int8_all, _thresholds(predictor))
    metric = "mAP" if predictor.multi_label else "accuracy"
    fp32_quality = quality(fp32_all, targets, predictor.multi_label) or 0.0
    int8_quality = quality(int8_all, targets, predictor.multi_label) or 0.0
    drop = fp32_quality - int8_quality
    offered = int8_passes(found, drop)
    why = (f"on {found.images} images of the {where}: int8 gives the fp32 model's answer on "
           f"{found.agreement:.1%} (bound {INT8_MIN_AGREEMENT:.0%}); {metric} "
           f"{int8_quality:.1%} against {fp32_quality:.1%} (bound: within "
           f"{100 * INT8_MAX_DROP:.1f} points)")
    if not offered:
        (out / INT8_FILE).unlink(missing_ok=True)
    return {"offered": offered, "why": why, **found.to_dict(), "metric": metric,
            "quality": int8_quality, "fp32_quality": fp32_quality}

