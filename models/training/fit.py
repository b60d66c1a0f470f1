"""``fit``: compose data, backbone, head, freezing plan, optimizer and schedule into a run.

No Celery, DB or HTTP here: progress leaves through callbacks, cancellation comes in through
``should_stop``, and everything needed to continue is in the per-epoch checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models.backbones import create_backbone
from models.data.discover import ImageFolderIndex, Sample, scan_image_folder
from models.data.source import ImageSource
from models.data.split import stratified_split
from models.data.transforms import augment, normalize, stored_size
from models.errors import DatasetError
from models.evaluation import evaluate_splits
from models.network import FineTuneModel, build_head
from models.preprocessing import Preprocessing
from models.spec import FineTuneSpec, parse_spec
from models.training.checkpoint import (
    checkpoint_folder,
    load_best_weights,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_best_weights,
    save_checkpoint,
)
from models.training.early_stopping import EarlyStopping
from models.training.loop import BatchHook, EpochStats, evaluate, train_one_epoch
from models.training.runtime import Precision, configure_backends, resolve_device, resolve_precision
from models.tuning.freezing import (
    apply_freezing,
    backbone_is_frozen,
    set_train_mode,
    trainable_stage_count,
)
from models.tuning.optimizers import create_optimizer
from models.tuning.param_groups import HEAD, join_order, unit_param_groups
from models.tuning.schedules import lr_multiplier

log = logging.getLogger(__name__)


@dataclass
class Callbacks:
    on_epoch_end: Callable[[dict], None] | None = None  # gets the epoch's metrics row
    on_batch_end: Callable[[int, int, int, float], None] | None = None  # epoch, step, steps, loss
    should_stop: Callable[[], bool] | None = None  # checked at every batch boundary


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
    callbacks = callbacks or Callbacks()
    index = data if isinstance(data, ImageFolderIndex) else scan_image_folder(data)
    train_samples, val_samples = _split(index, spec)

    torch_device = resolve_device(device)
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
    stages = backbone.stages

    train_source = ImageSource([s.path for s in train_samples], [s.label for s in train_samples],
                               prep, stored_size(prep, spec.augment))
    val_source = ImageSource([s.path for s in val_samples], [s.label for s in val_samples],
                             prep, prep.input_size)
    run = _Run(model, spec, stages, prep, precision, train_source, val_source, cache_features)

    history: list[dict] = []
    monitor = _monitored_key(spec, has_val=bool(val_samples))
    stopper = EarlyStopping(monitor, spec.early_stopping.patience, spec.early_stopping.min_delta)
    first_epoch = 0
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else None
    if resume is not None:
        state = load_checkpoint(resume)
        if state["classes"] != index.classes:
            raise DatasetError(f"checkpoint classes {state['classes']} differ from the "
                               f"dataset's {index.classes}")
        model.load_state_dict(state["model"])
        run.set_trainable(state["n_trainable"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scaler.load_state_dict(state["scaler"])
        run.step = state["step"]
        first_epoch, history = state["epoch"], state["history"]
        stopper.load_state_dict(state["early_stopping"])
        run.best_state = load_best_weights(checkpoint_folder(resume))
        restore_rng_state(state["rng"])
        log.info("resumed from %s at epoch %d", resume, first_epoch)

    stopped_early = stopper.should_stop and first_epoch < spec.epochs
    for epoch in range(first_epoch, spec.epochs if not stopped_early else first_epoch):
        row = run.epoch(epoch, callbacks)
        improved = stopper.update(row[monitor], epoch + 1)
        if improved:
            run.best_state = {k: v.detach().to("cpu", copy=True)
                              for k, v in model.state_dict().items()}
            if ckpt_dir is not None:
                save_best_weights(ckpt_dir, run.best_state)
        history.append(row)
        if ckpt_dir is not None:
            save_checkpoint(ckpt_dir, {
                "epoch": epoch + 1, "step": run.step, "n_trainable": run.n_trainable,
                "model": model.state_dict(), "optimizer": run.optimizer.state_dict(),
                "scaler": run.scaler.state_dict(), "early_stopping": stopper.state_dict(),
                "history": history, "spec": spec.model_dump(mode="json"),
                "classes": index.classes, "preprocessing": prep.to_dict(), "rng": rng_state(),
            })
        if callbacks.on_epoch_end is not None:
            callbacks.on_epoch_end(row)
        if stopper.should_stop and epoch + 1 < spec.epochs:
            stopped_early = True
            log.info("early stopping after epoch %d (best epoch %s)", epoch + 1,
                     stopper.best_epoch)
            break

    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    model.eval()
    evaluation = evaluate_splits(model, {"val": val_samples, "test": index.test or []},
                                 index.classes, prep, torch_device, precision, index.root,
                                 val_source=val_source)
    best_epoch = stopper.best_epoch or len(history)
    best_row = history[best_epoch - 1] if history else {}
    return FitResult(
        model=model, spec=spec, classes=index.classes, preprocessing=prep,
        backbone=backbone.name, architecture=backbone.architecture,
        weights_source=backbone.weights_source, history=history, best_epoch=best_epoch,
        best_metrics={k: best_row.get(k) for k in ("epoch", "train_loss", "train_accuracy",
                                                    "val_loss", "val_accuracy")},
        stopped_early=stopped_early, device=str(torch_device), precision=precision.name,
        num_train=len(train_samples), num_val=len(val_samples), skipped=index.skipped,
        dataset_hash=index.content_hash, evaluation=evaluation,
        seconds=time.perf_counter() - started,
    )


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


class _Run:
    """Mutable state of one run: freezing level, optimizer, step, feature caches."""

    def __init__(self, model: FineTuneModel, spec: FineTuneSpec, stages: list[list[str]],
                 prep: Preprocessing, precision: Precision, train_source: ImageSource,
                 val_source: ImageSource, cache_features: bool) -> None:
        self.model, self.spec, self.stages, self.prep = model, spec, stages, prep
        self.precision, self.device = precision, precision.device
        self.train_source, self.val_source = train_source, val_source
        self.cache_features = cache_features
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=spec.label_smoothing)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=precision.needs_grad_scaler)
        self.best_state: dict | None = None
        self.step = 0
        n = len(train_source)
        # A final batch of one sample breaks BatchNorm in train mode: drop it.
        self.samples_per_epoch = n - 1 if n % spec.batch_size == 1 and n > 1 else n
        self.steps_per_epoch = math.ceil(self.samples_per_epoch / spec.batch_size)
        self.total_steps = self.steps_per_epoch * spec.epochs
        self.warmup_steps = round(spec.schedule.warmup_epochs * self.steps_per_epoch)
        self._features: dict[str, torch.Tensor] = {}
        self.n_trainable = trainable_stage_count(spec.freeze, 0, len(stages))
        apply_freezing(model, stages, self.n_trainable)
        groups = [g for unit in join_order(len(stages), self.n_trainable)
                  for g in unit_param_groups(model, stages, unit, spec.optimizer)]
        self.optimizer = create_optimizer(groups, spec.optimizer)

    def set_trainable(self, n_trainable: int) -> None:
        """Unfreeze more stages; their parameters join the optimizer as new groups, so the
        state (momentum, Adam moments) of the groups already training is kept."""
        if n_trainable == self.n_trainable:
            return
        if n_trainable < self.n_trainable:
            raise ValueError("stages are never re-frozen during a run")
        num = len(self.stages)
        joined = join_order(num, n_trainable)[len(join_order(num, self.n_trainable)):]
        for unit in joined:
            for group in unit_param_groups(self.model, self.stages, unit, self.spec.optimizer):
                self.optimizer.add_param_group(group)
        self.n_trainable = n_trainable
        apply_freezing(self.model, self.stages, n_trainable)

    def grad_groups(self) -> dict[str, list[nn.Parameter]]:
        by_name = dict(self.model.backbone.named_parameters())
        groups = {"head": list(self.model.head.parameters())}
        for unit in join_order(len(self.stages), self.n_trainable):
            if unit != HEAD:
                groups[f"stage{unit}"] = [by_name[n] for n in self.stages[unit]]
        return groups

    def epoch(self, epoch: int, callbacks: Callbacks) -> dict:
        started = time.perf_counter()
        self.set_trainable(trainable_stage_count(self.spec.freeze, epoch, len(self.stages)))
        set_train_mode(self.model, self.n_trainable, self.spec.freeze.batchnorm)
        frozen = self.cache_features and backbone_is_frozen(self.n_trainable,
                                                             self.spec.freeze.batchnorm)
        use_train_cache = frozen and self.spec.augment == "none"
        order = self._order(epoch)
        if use_train_cache:
            module: nn.Module = self.model.head
            batches = self._feature_batches("train", order)
        else:
            module, batches = self.model, self._image_batches(order, training=True)
        on_batch: BatchHook | None = None
        if callbacks.on_batch_end is not None:
            hook = callbacks.on_batch_end

            def on_batch(step: int, steps: int, loss: float) -> None:
                hook(epoch + 1, step, steps, loss)

        stats: EpochStats = train_one_epoch(
            module, batches, self.optimizer, loss_fn=self.loss_fn, precision=self.precision,
            scaler=self.scaler, first_step=self.step,
            lr_at_step=lambda s: lr_multiplier(self.spec.schedule.name, s, self.total_steps,
                                               self.warmup_steps),
            grad_groups=self.grad_groups(), grad_clip_norm=self.spec.grad_clip_norm,
            steps_in_epoch=self.steps_per_epoch, on_batch=on_batch,
            should_stop=callbacks.should_stop,
        )
        self.step += stats.steps
        val_loss = val_accuracy = None
        if len(self.val_source):
            self.model.eval()
            val_order = torch.arange(len(self.val_source))
            if frozen:
                val_batches = self._feature_batches("val", val_order)
                val_loss, val_accuracy = evaluate(self.model.head, val_batches,
                                                  loss_fn=self.loss_fn, precision=self.precision)
            else:
                val_loss, val_accuracy = evaluate(
                    self.model, self._image_batches(val_order, training=False, split="val"),
                    loss_fn=self.loss_fn, precision=self.precision)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {
            "epoch": epoch + 1,
            "train_loss": stats.loss,
            "train_accuracy": stats.accuracy,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
            "grad_norm": stats.grad_norm,
            "stage_grad_norms": stats.stage_grad_norms,
            "trainable_stages": self.n_trainable,
            "trainable_params": trainable,
            "feature_cache": use_train_cache,
        }

    def _order(self, epoch: int) -> torch.Tensor:
        # A generator of its own per epoch: the order depends only on (seed, epoch), so a resumed
        # run and a feature-cached run see exactly the batches an uninterrupted run sees.
        generator = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_source), generator=generator)[:self.samples_per_epoch]

    def _image_batches(self, order: torch.Tensor, *, training: bool,
                       split: str = "train") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        source = self.train_source if split == "train" else self.val_source
        cuda = self.device.type == "cuda"
        for images, labels, _ in source.batches(order, self.spec.batch_size, pin=cuda):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            batch = images.float()
            if training and self.spec.augment != "none":
                batch = augment(batch, self.prep.input_size, self.spec.augment)
            batch = normalize(batch, self.prep)
            if cuda:
                batch = batch.contiguous(memory_format=torch.channels_last)
            yield batch, labels

    def _feature_batches(self, split: str,
                         order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        features, labels = self._cached_features(split)
        order = order.to(self.device)
        for start in range(0, len(order), self.spec.batch_size):
            idx = order[start:start + self.spec.batch_size]
            yield features[idx], labels[idx]

    @torch.no_grad()
    def _cached_features(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self._features:
            source = self.train_source if split == "train" else self.val_source
            self.model.backbone.eval()
            chunks = []
            for batch, _ in self._image_batches(torch.arange(len(source)), training=False,
                                                split=split):
                with self.precision.autocast():
                    chunks.append(self.model.backbone(batch).float())
            self._features[split] = torch.cat(chunks)
            self._features[split + "_labels"] = source.labels.to(self.device)
        return self._features[split], self._features[split + "_labels"]
