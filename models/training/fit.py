"""``fit``: compose data, backbone, head, freezing plan, optimizer and schedule into a run.

No Celery, DB or HTTP here: progress leaves through callbacks, cancellation comes in through
``should_stop``, and everything needed to continue is in the per-epoch checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ftune.models import memory
from ftune.models.backbones import Backbone, create_backbone
from ftune.models.backbones.catalog import PACKAGED_BACKBONES
from ftune.models.data.discover import ImageFolderIndex, Sample, scan_image_folder
from ftune.models.data.source import ImageSource
from ftune.models.data.split import stratified_split
from ftune.models.data.transforms import stored_size
from ftune.models.errors import DatasetError, ResourceError
from ftune.models.evaluation import evaluate_splits
from ftune.models.network import FineTuneModel, build_head
from ftune.models.preprocessing import Preprocessing
from ftune.models.settings import engine_settings
from ftune.models.spec import FineTuneSpec, parse_spec
from ftune.models.training.checkpoint import (
    checkpoint_folder,
    load_best_weights,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_best_weights,
    save_checkpoint,
)
from ftune.models.training.early_stopping import EarlyStopping
from ftune.models.training.run import Callbacks, TrainingRun
from ftune.models.training.runtime import (
    configure_backends,
    device_memory_bytes,
    resolve_device,
    resolve_precision,
)

log = logging.getLogger(__name__)

# The estimate is rough; leave the device some room besides the run.
MEMORY_HEADROOM = 0.9

__all__ = ["Callbacks", "FitResult", "fit"]


@dataclass
class FitResult:
    model: FineTuneModel
    spec: FineTuneSpec
    classes: list[str]
    preprocessing: Preprocessing
    backbone: str
    architecture: str
    weights_source: str | None
    history: list[dict]
    best_epoch: int
    best_metrics: dict
    stopped_early: bool
    device: str
    precision: str
    num_train: int
    num_val: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    dataset_hash: str | None = None  # content hash of the data trained on
    evaluation: dict = field(default_factory=dict)  # split -> models.evaluation.summarize()
    seconds: float = 0.0


@dataclass
class _Progress:
    """Where the epoch loop stands; restored from a checkpoint when resuming."""

    stopper: EarlyStopping
    monitor: str
    history: list[dict] = field(default_factory=list)
    first_epoch: int = 0


def fit(
    data: str | Path | ImageFolderIndex,
    spec: FineTuneSpec | dict | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: str | Path | None = None,
    callbacks: Callbacks | None = None,
    device: str | None = None,
    cache_features: bool = True,
) -> FitResult:
    """Fine-tune on an image-folder dataset and return the model with its best weights.

    ``cache_features``: when no backbone parameter trains and augmentation is off, compute the
    backbone's features once and train the head on them (same result, far faster).
    """
    started = time.perf_counter()
    spec = spec if isinstance(spec, FineTuneSpec) else parse_spec(spec)
    index = data if isinstance(data, ImageFolderIndex) else scan_image_folder(data)
    train_samples, val_samples = _split(index, spec)
    backbone, run = _build_run(index, spec, train_samples, val_samples, device=device,
                               cache_features=cache_features)
    monitor = _monitored_key(spec, has_val=bool(val_samples))
    progress = _Progress(EarlyStopping(monitor, spec.early_stopping.patience,
                                       spec.early_stopping.min_delta), monitor)
    if resume is not None:
        _resume(run, progress, index, resume)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else None
    callbacks = callbacks or Callbacks()
    run.should_stop = callbacks.should_stop
    stopped_early = _train_epochs(run, progress, callbacks, ckpt_dir, index.classes)
    if run.best_state is not None:
        run.model.load_state_dict(run.best_state)
    run.model.eval()
    evaluation = evaluate_splits(run.model, {"val": val_samples, "test": index.test or []},
                                 index.classes, run.prep, run.device, run.precision,
                                 index.root, val_source=run.val_source,
                                 should_stop=callbacks.should_stop)
    return _result(run, backbone, index, progress, stopped_early=stopped_early,
                   evaluation=evaluation, num_train=len(train_samples),
                   num_val=len(val_samples), seconds=time.perf_counter() - started)


def _split(index: ImageFolderIndex, spec: FineTuneSpec) -> tuple[list[Sample], list[Sample]]:
    if index.val is not None:
        return index.train, index.val
    train_idx, val_idx = stratified_split([s.label for s in index.train], spec.val_fraction,
                                          spec.seed)
    return [index.train[i] for i in train_idx], [index.train[i] for i in val_idx]


def _monitored_key(spec: FineTuneSpec, *, has_val: bool) -> str:
    """The metrics key early stopping watches; training metrics when there is no val split."""
    monitor = spec.early_stopping.monitor
    return monitor if has_val else monitor.replace("val_", "train_")


def _build_run(index: ImageFolderIndex, spec: FineTuneSpec, train_samples: list[Sample],
               val_samples: list[Sample], *, device: str | None,
               cache_features: bool) -> tuple[Backbone, TrainingRun]:
    """Backbone, head and data sources on the chosen device, ready for the first epoch."""
    torch_device = resolve_device(device)
    check_memory(spec, torch_device, num_classes=len(index.classes),
                 num_images=len(train_samples) + len(val_samples))
    precision = resolve_precision(spec.mixed_precision, torch_device)
    configure_backends(torch_device)
    torch.manual_seed(spec.seed)
    backbone = create_backbone(spec.backbone, pretrained=spec.pretrained,
                               weights_path=spec.weights_path, image_size=spec.image_size)
    torch.manual_seed(spec.seed)  # the head's init must not depend on how the backbone was built
    model = FineTuneModel(backbone.model,
                          build_head(backbone.num_features, len(index.classes), spec.head))
    model = model.to(torch_device)
    if torch_device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    prep = backbone.preprocessing
    train_source = ImageSource([s.path for s in train_samples], [s.label for s in train_samples],
                               prep, stored_size(prep, spec.augment))
    val_source = ImageSource([s.path for s in val_samples], [s.label for s in val_samples],
                             prep, prep.input_size)
    return backbone, TrainingRun(model, spec, backbone.stages, prep, precision, train_source,
                                 val_source, cache_features)


def check_memory(spec: FineTuneSpec, device: torch.device, *, num_classes: int,
                 num_images: int) -> None:
    """Refuse, with the numbers, a run that would not fit the device's memory."""
    capacity = device_memory_bytes(device)
    needed = memory.estimate(spec, num_classes=num_classes, num_images=num_images,
                             image_size=spec.image_size or _default_size(spec.backbone),
                             decode_cache_bytes=engine_settings().decode_cache_bytes)
    if capacity is None or needed is None or needed.total_bytes <= capacity * MEMORY_HEADROOM:
        return
    raise ResourceError(
        f"this run needs {needed.describe()} but the {device.type} has "
        f"{capacity / 2**30:.1f} GB; lower batch_size or image_size, or freeze more of the "
        "backbone (freeze.strategy head_only or last_n_blocks)")


def _default_size(backbone: str) -> int | None:
    entry = PACKAGED_BACKBONES.get(backbone)
    return entry.input_size if entry else None


def _resume(run: TrainingRun, progress: _Progress, index: ImageFolderIndex,
            resume: str | Path) -> None:
    state = load_checkpoint(resume)
    if state["classes"] != index.classes:
        raise DatasetError(f"checkpoint classes {state['classes']} differ from the "
                           f"dataset's {index.classes}")
    run.model.load_state_dict(state["model"])
    run.set_trainable(state["n_trainable"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    run.step = state["step"]
    progress.first_epoch, progress.history = state["epoch"], state["history"]
    progress.stopper.load_state_dict(state["early_stopping"])
    run.best_state = load_best_weights(checkpoint_folder(resume))
    restore_rng_state(state["rng"])
    log.info("resumed from %s at epoch %d", resume, progress.first_epoch)


def _train_epochs(run: TrainingRun, progress: _Progress, callbacks: Callbacks,
                  ckpt_dir: Path | None, classes: list[str]) -> bool:
    """Run the remaining epochs; True when early stopping ended the run before the last."""
    epochs, stopper = run.spec.epochs, progress.stopper
    if stopper.should_stop and progress.first_epoch < epochs:
        return True  # a resumed run that had already stopped early
    for epoch in range(progress.first_epoch, epochs):
        row = run.epoch(epoch, callbacks)
        if stopper.update(row[progress.monitor], epoch + 1):
            best = run.remember_best()
            if ckpt_dir is not None:
                save_best_weights(ckpt_dir, best)
        progress.history.append(row)
        if ckpt_dir is not None:
            _save_checkpoint(run, progress, ckpt_dir, classes, epoch + 1)
        if callbacks.on_epoch_end is not None:
            callbacks.on_epoch_end(row)
        if stopper.should_stop and epoch + 1 < epochs:
            log.info("early stopping after epoch %d (best epoch %s)", epoch + 1,
                     stopper.best_epoch)
            return True
    return False


def _save_checkpoint(run: TrainingRun, progress: _Progress, ckpt_dir: Path,
                     classes: list[str], epochs_done: int) -> None:
    save_checkpoint(ckpt_dir, {
        "epoch": epochs_done, "step": run.step, "n_trainable": run.n_trainable,
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(), "early_stopping": progress.stopper.state_dict(),
        "history": progress.history, "spec": run.spec.model_dump(mode="json"),
        "classes": classes, "preprocessing": run.prep.to_dict(), "rng": rng_state(),
    })


def _result(run: TrainingRun, backbone: Backbone, index: ImageFolderIndex, progress: _Progress,
            *, stopped_early: bool, evaluation: dict, num_train: int, num_val: int,
            seconds: float) -> FitResult:
    history = progress.history
    best_epoch = progress.stopper.best_epoch or len(history)
    best_row = history[best_epoch - 1] if history else {}
    return FitResult(
        model=run.model, spec=run.spec, classes=index.classes, preprocessing=run.prep,
        backbone=backbone.name, architecture=backbone.architecture,
        weights_source=backbone.weights_source, history=history, best_epoch=best_epoch,
        best_metrics={k: best_row.get(k) for k in ("epoch", "train_loss", "train_accuracy",
                                                    "val_loss", "val_accuracy")},
        stopped_early=stopped_early, device=str(run.device), precision=run.precision.name,
        num_train=num_train, num_val=num_val, skipped=index.skipped,
        dataset_hash=index.content_hash, evaluation=evaluation, seconds=seconds,
    )
