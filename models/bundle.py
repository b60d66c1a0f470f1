"""The tuned-model bundle on disk: model.safetensors, config.json, metrics.json.

Written into a hidden temporary folder and renamed into place, so a failed or interrupted
write never leaves a folder that looks like a model. Importing this module loads no torch (the
API lists bundle files with it); reading and writing weights does.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import uuid
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from ftune.models.errors import OutputExistsError

if TYPE_CHECKING:
    import torch

    from ftune.models.training.fit import FitResult

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
EVALUATION_FILE = "evaluation.json"
BUNDLE_FILES = (WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE)  # what Predictor.load reads
FORMAT_VERSION = 1


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("ftune", "torch", "torchvision", "timm", "safetensors", "pillow", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def ensure_output_free(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists():
        raise OutputExistsError(f"output {out} already exists; choose another --out or remove it")
    return out


def bundle_config(result: FitResult) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "backbone": result.backbone,
        "architecture": result.architecture,
        "classes": result.classes,
        "task": result.task,
        # Temperature (one, or one per class) and multi-label thresholds (models.calibration).
        "calibration": result.calibration or None,
        "preprocessing": result.preprocessing.to_dict(),
        "spec": result.spec.model_dump(mode="json"),
        "weights_source": result.weights_source,
        "best_epoch": result.best_epoch,
        "best_metrics": result.best_metrics,
        "stopped_early": result.stopped_early,
        "epochs_run": len(result.history),
        "dataset_hash": result.dataset_hash,
        "num_train": result.num_train,
        "num_val": result.num_val,
        "skipped": [{"path": p, "reason": r} for p, r in result.skipped],
        "device": result.device,
        "precision": result.precision,
        "train_seconds": round(result.seconds, 3),
        "resolved": result.resolved,
        "lr_range_test": result.lr_curve,
        "diagnosis": result.diagnosis,
        "versions": package_versions(),
        "created_at": datetime.now(UTC).isoformat(),
    }


def save_bundle(result: FitResult, out_dir: str | Path) -> Path:
    from safetensors.torch import save_file

    out = ensure_output_free(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in result.model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(tmp / CONFIG_FILE, bundle_config(result))
        _write_json(tmp / METRICS_FILE, {"history": result.history,
                                         "best_epoch": result.best_epoch})
        _write_json(tmp / EVALUATION_FILE, result.evaluation)
        ensure_output_free(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_bundle(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    directory = Path(directory)
    missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a tuned model: missing {', '.join(missing)}")
    config = json.loads((directory / CONFIG_FILE).read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: unsupported model format {config.get('format_version')}")
    return config, load_file(str(directory / WEIGHTS_FILE))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
