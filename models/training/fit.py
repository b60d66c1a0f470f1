"""``fit``: compose data, backbone, head, freezing plan, optimizer and schedule into a run.

No Celery, DB or HTTP here: progress leaves through callbacks, cancellation comes in through
``should_stop``, and everything needed to continue is in the per-epoch checkpoint.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ftune.models import memory
from ftune.models.auto_fields import decided
from ftune.models.backbones import Backbone, create_backbone
from ftune.models.calibration import Calibration, calibrate
from ftune.models.data.discover import ImageFolderIndex, Sample, scan_image_folder
from ftune.models.data.images import open_checked
from ftune.models.data.source import ImageSource
from ftune.models.data.transforms import stored_size
from ftune.models.derived.decoded import DecodedImages, decoded_images
from ftune.models.derived.store import DerivedStore
from ftune.models.diagnosis import diagnose, multi_label_chance
from ftune.models.errors import DatasetError, ResourceError
from ftune.models.evaluation import split_logits, summarize_split
from ftune.models.explain import explain_worst
from ftune.models.network import FineTuneModel, build_head
from ftune.models.parallel import ranks
from ftune.models.preprocessing import Preprocessing
from ftune.models.recipe import rules
from ftune.models.recipe.choices import Choices
from ftune.models.recipe.plan import StagePlan
from ftune.models.recipe.presets import PRESETS
from ftune.models.recipe.resolve import apply_static, backbone_size, resolve_static, two_stage
from ftune.models.recipe.stats import DatasetStats
from ftune.models.settings import engine_settings
from ftune.models.spec import FineTuneSpec, parse_spec
from ftune.models.task_checks import (
    MULTI_LABEL,
    VAL_WITHOUT_LABELS,
    task_name,
    task_problem,
)
from ftune.models.tasks import TASKS, Task, labels_of
from ftune.models.training.budget import Budget
from ftune.models.training.checkpoint import checkpoint_folder, load_checkpoint
from ftune.models.training.early_stopping import EarlyStopping
from ftune.models.training.refit import refit_head
from ftune.models.training.run import TrainingRun
from ftune.models.training.run_setup import Callbacks, RunSetup
from ftune.models.training.runtime import (
    channels_last,
    configure_backends,
    device_memory_bytes,
    resolve_device,
    resolve_precision,
)
from ftune.models.training.stages import Progress, StageRunner, plan_with_lr
from ftune.models.training.unlabeled import (
    pretrain_stage,
    pseudo_label_rounds,
    require_unlabeled,
    unlabeled_of,
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
    resolved: dict = field(default_factory=dict)  # auto field -> {"value", "why"}
    lr_curve: list[dict] = field(default_factory=list)  # the range test's [{"lr", "loss"}]
    diagnosis: list[dict] = field(default_factory=list)  # models.diagnosis findings
    pretrain_history: list[dict] = field(default_factory=list)  # pretraining epochs' rows
    task: str = "single_label"  # or "multi_label" (models.tasks)
    calibration: dict = field(default_factory=dict)  # models.calibration.Calibration


def fit(
    data: str | Path | ImageFolderIndex,
    spec: FineTuneSpec | dict | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: str | Path | None = None,
    callbacks: Callbacks | None = None,
    device: str | None = None,
    cache_features: bool = True,
    resolved: dict | None = None,
    time_limit_s: float | None = None,
    derived: DerivedStore | None = None, owner: str | None = None,
    unlabeled: str | Path | ImageFolderIndex | None = None,
) -> FitResult:
    """Fine-tune on an image-folder dataset and return the model with its best weights.

    ``cache_features``: train a frozen backbone's head on features computed once.
    ``resolved``: auto choices the API made at submit. ``time_limit_s``: the job's run-time
    limit. ``derived``: where decoded images, features and adapted backbones are kept for
    later jobs (accounted to ``owner``). ``unlabeled``: a dataset of unlabelled images.
    """
    started = time.perf_counter()
    spec = spec if isinstance(spec, FineTuneSpec) else parse_spec(spec)
    index = data if isinstance(data, ImageFolderIndex) else scan_image_folder(data)
    task = task_for(spec, index)
    train_samples, val_samples = _split(index, spec, task)
    callbacks, state = callbacks or Callbacks(), _checkpoint_state(resume, index.classes)
    choices = _run_choices(state, spec, train_samples, index, resolved, callbacks, task)
    spec = apply_static(spec, choices.to_dict())
    _enter(callbacks, "features")
    choices.notify()
    setup = _build_setup(index, spec, train_samples, val_samples, device=device,
                         derived=derived, owner=owner, cache_features=cache_features,
                         task=task)
    setup.connect(callbacks, choices)
    pool, pretrained = _pretrain(setup, spec, index, train_samples, unlabeled=unlabeled,
                                 checkpoints=_folder(checkpoint_dir, resume))
    budget = Budget.start(spec, choices, time_limit_s, started, _spent_before(state))
    plans, lr_curve, features = plan_with_lr(setup, spec, resumed=state is not None)
    choices.notify()
    progress = _progress(spec, plans[0], has_val=bool(val_samples))
    stages = StageRunner(setup, plans, progress, budget, classes=index.classes,
                         ckpt_dir=Path(checkpoint_dir) if checkpoint_dir else None)
    final_run, stopped_early = stages.run_all(features, state)
    if not ranks.leave().writes:  # rank 0 evaluates and builds the model alone
        raise ranks.ShareDone
    pseudo_label_rounds(stages, spec, train=train_samples, unlabeled=pool, resume=resume)
    refits = _refits(spec, stages, index, has_val=bool(val_samples))
    evaluation, calibration = _evaluate(stages, index, val_samples, refit=refits)
    result = _result(final_run, setup.backbone, index, progress, stopped_early=stopped_early,
                     evaluation=evaluation, num_train=len(train_samples),
                     num_val=len(val_samples), seconds=time.perf_counter() - started)
    # The spec as asked, with the statistics' choices filled in: given back to fit, the same
    # data and seed make the same remaining choices (learning rates, epochs) again.
    result.spec, result.resolved, result.lr_curve, result.pretrain_history = \
        spec, choices.to_dict(), lr_curve, pretrained
    result.diagnosis = _diagnose(result, train_samples)
    result.calibration = calibration.to_dict()
    return result


def _run_choices(state: dict | None, spec: FineTuneSpec, train_samples: list[Sample],
                 index: ImageFolderIndex, resolved: dict | None, callbacks: Callbacks,
                 task: Task) -> Choices:
    """A resumed run keeps every choice it had made; a new one starts from the static ones.
    Either way the devices are this attempt's, whatever an earlier one's were."""
    choices = Choices((state or {}).get("resolved") or static_choices(
        spec, train_samples, index.classes, resolved, unlabeled=len(index.unlabeled),
        task=task), on_resolved=callbacks.on_resolved)
    if resolved and "devices" in resolved:
        choices.record("devices", Choices(resolved).choice("devices"))
    return choices


def _diagnose(result: FitResult, train_samples: list[Sample]) -> list[dict]:
    spec = result.spec
    counts = TASKS[result.task].class_counts(train_samples, result.classes)
    chance = (multi_label_chance(counts, len(train_samples)) if result.task == MULTI_LABEL
              else None)
    return diagnose(result.history, num_classes=len(result.classes),
                    evaluation=result.evaluation, class_weights=spec.class_weights,
                    stopped_early=result.stopped_early, best_epoch=result.best_epoch,
                    class_counts=counts, unlabeled_advice=result.resolved.get("unlabeled"),
                    uses_unlabeled=spec.uses_unlabeled, chance=chance)


def _rebuilt_head_run(stages: StageRunner) -> TrainingRun | None:
    """After a resume, the best weights may come from the head stage of an earlier attempt:
    a run of that stage (its features cached again when needed) stands in for it."""
    history, best = stages.progress.history, stages.progress.stopper.best_epoch
    first = stages.plans[0]
    if not best or best > len(history) or first.trains_backbone or \
            history[best - 1].get("stage") != first.name:
        return None
    return TrainingRun(stages.setup, first)


def _unlabeled_samples(spec: FineTuneSpec, index: ImageFolderIndex,
                       extra: str | Path | ImageFolderIndex | None) -> list[Sample]:
    """The unlabelled images the spec uses (none when it uses none); DatasetError when it
    needs them and there are none."""
    if not spec.uses_unlabeled:
        return []
    if extra is not None and not isinstance(extra, ImageFolderIndex):
        extra = scan_image_folder(extra, kind="unlabeled")
    samples = unlabeled_of(index, extra)
    require_unlabeled(spec, samples)
    return samples


def _pretrain(setup: RunSetup, spec: FineTuneSpec, index: ImageFolderIndex,
              train_samples: list[Sample], *, unlabeled: str | Path | ImageFolderIndex | None,
              checkpoints: Path | None) -> tuple[list[Sample], list[dict]]:
    """The unlabelled images the spec uses, and the pretraining epochs' rows (checkpointed
    beside the run's own checkpoints)."""
    samples = _unlabeled_samples(spec, index, unlabeled)
    return samples, pretrain_stage(setup, spec, train_samples, samples,
                                   checkpoint_dir=checkpoints)


def _folder(checkpoint_dir: str | Path | None, resume: str | Path | None) -> Path | None:
    """Where this run's checkpoints go: the folder asked for, else the one resumed from."""
    if checkpoint_dir is not None:
        return Path(checkpoint_dir)
    return checkpoint_folder(resume) if resume is not None else None


def _spent_before(state: dict | None) -> float:
    """Seconds of the time budget earlier attempts spent (from the checkpoint)."""
    return float(state.get("budget_spent_s", 0.0)) if state else 0.0


def _refits(spec: FineTuneSpec, stages: StageRunner, index: ImageFolderIndex, *,
            has_val: bool) -> bool:
    """Whether the head is trained again on train+val once its epochs are chosen: when the
    best weights are a head trained alone on cached features (preset fast, or a fine-tuning
    stage that never beat the head)."""
    if stages.best_run is None:  # resumed after the best epoch: its run is gone
        stages.best_run = _rebuilt_head_run(stages)
    best = stages.best_run
    head_alone_cached = (stages.setup.cache_features and has_val and best is not None
                         and best.backbone_frozen and best.spec.augment == "none")
    refits = rules.refit(spec.refit, val_carved=index.val is None,
                         head_alone_cached=head_alone_cached)
    if refits and spec.refit == "auto" and stages.setup.task.name == MULTI_LABEL:
        stages.setup.choices.record("refit", rules.no_refit_multi_label())
        return False
    return refits


def _evaluate(stages: StageRunner, index: ImageFolderIndex, val_samples: list[Sample], *,
              refit: bool) -> tuple[dict, Calibration]:
    """The best weights, evaluated on val, where the calibration (temperature, multi-label
    thresholds) is fitted; then, with ``refit``, the head trained again on train+val (a
    recorded choice; val's calibration carries over, as val is then trained on); then
    evaluated on test."""
    setup, callbacks = stages.setup, stages.setup.callbacks
    model, task = setup.model, setup.task
    if stages.best_state is not None:
        model.load_state_dict(stages.best_state)
    model.eval()
    history = len(stages.progress.history)
    _enter(callbacks, "evaluate", history)
    val_logits = split_logits(model, "val", val_samples, setup, index.root,
                              stages.best_val_features())
    calibration = calibrate(val_logits, task.targets(val_samples, len(index.classes)), task,
                            seed=stages.plans[0].spec.seed, classes=index.classes)
    setup.choices.record("calibration", rules.calibration_choice(
        calibration.kept, calibration.temperature, calibration.why, calibration.warnings))

    def summary(logits: torch.Tensor, samples: list[Sample]) -> dict:
        return summarize_split(logits, samples, task, calibration, classes=index.classes,
                               root=index.root)

    evaluation = {"val": summary(val_logits, val_samples)} if val_samples else {}
    if refit and stages.best_run is not None:
        _enter(callbacks, "refit", history)
        best = stages.best_run
        epochs = (stages.progress.stopper.best_epoch or history) - best.epoch_offset
        images = refit_head(best, epochs)
        setup.choices.record("refit", rules.refit_choice(
            images, epochs, capped=epochs >= decided(best.spec.epochs)))
        _enter(callbacks, "evaluate", history)
    setup.choices.notify()
    test = index.test or []
    if test:
        logits = split_logits(model, "test", test, setup, index.root,
                              stages.shared_features_of(test, index.root))
        evaluation["test"] = summary(logits, test)
    # The split the card shows: its worst files get heat maps of where the model looked.
    shown = evaluation.get("test") or evaluation.get("val")
    if shown and shown.get("num_images"):
        try:
            explain_worst(model, setup.prep, index.root, shown, index.classes)
        except Exception:  # an extra for the card: never worth the run it follows
            log.warning("the worst files could not be explained", exc_info=True)
    return evaluation, calibration


def _checkpoint_state(resume: str | Path | None, classes: list[str]) -> dict | None:
    if resume is None:
        return None
    state = load_checkpoint(resume)
    if state.get("classes") != classes:
        raise DatasetError(f"checkpoint classes {state.get('classes')} differ from the "
                           f"dataset's {classes}")
    log.info("resuming from %s at epoch %d", resume, state["epoch"])
    return state


def _enter(callbacks: Callbacks, stage: str, epochs: int = 0) -> None:
    """Report a stage beyond the planned ones (``epochs``: the history's rows so far)."""
    if callbacks.on_stage is not None:
        callbacks.on_stage(stage, epochs, 0)


def task_for(spec: FineTuneSpec, index: ImageFolderIndex) -> Task:
    """The spec's task, or the dataset's (``auto``); DatasetError when they do not fit."""
    problem = task_problem(spec.task, index.task, monitor=spec.early_stopping.monitor,
                           pseudo_label_rounds=spec.pseudo_labels.rounds)
    if problem is not None:
        raise DatasetError(problem)
    return TASKS[task_name(spec.task, index.task)]


def static_choices(spec: FineTuneSpec, train_samples: list[Sample], classes: list[str],
                   prior: dict | None, unlabeled: int = 0, task: Task = TASKS["single_label"]
                   ) -> dict:
    """The auto choices the data's statistics decide; ``prior`` ones (the API's) are kept."""
    prior = dict(prior or {})
    needs_sizes = spec.image_size == "auto" and "image_size" not in prior
    stats = DatasetStats(task.class_counts(train_samples, classes),
                         median_short_side(train_samples) if needs_sizes else None,
                         unlabeled=unlabeled, images=len(train_samples), task=task.name)
    return resolve_static(spec, stats) | prior


def median_short_side(samples: list[Sample]) -> int | None:
    """Median of the images' shorter sides, from their headers (nothing is decoded)."""
    sides = []
    for sample in samples:
        try:
            with open_checked(sample.path) as image:
                sides.append(min(image.size))
        except Exception:  # an unreadable file is reported when it is decoded, not here
            continue
    return int(statistics.median_low(sides)) if sides else None


def _split(index: ImageFolderIndex, spec: FineTuneSpec,
           task: Task) -> tuple[list[Sample], list[Sample]]:
    """Train and val: the dataset's own, or val carved from train (stratified by class)."""
    if index.val is not None:
        if task.name == MULTI_LABEL and index.val and not any(map(labels_of, index.val)):
            raise DatasetError(VAL_WITHOUT_LABELS)
        return index.train, index.val
    train_idx, val_idx = task.split(index.train, spec.val_fraction, spec.seed)
    return [index.train[i] for i in train_idx], [index.train[i] for i in val_idx]


def _progress(spec: FineTuneSpec, first: StagePlan, *, has_val: bool) -> Progress:
    monitor = _monitored_key(spec, has_val=has_val)
    return Progress(EarlyStopping(monitor, decided(first.spec.early_stopping.patience),
                                  spec.early_stopping.min_delta), monitor)


def _monitored_key(spec: FineTuneSpec, *, has_val: bool) -> str:
    """The metrics key early stopping watches; training metrics when there is no val split."""
    monitor = spec.early_stopping.monitor
    if not has_val:  # no train_map: the loss stands in
        return "train_loss" if monitor == "val_map" else monitor.replace("val_", "train_")
    return monitor


def _decoded(index: ImageFolderIndex, prep: Preprocessing, size: int, *,
             derived: DerivedStore | None, owner: str | None,
             with_test: bool = True) -> DecodedImages | None:
    """The dataset's images decoded at ``size`` (without the test images unless
    ``with_test``), from the store (decoding them into it the first time). Every size holds
    the images in the same order, test images last: a row is the same image in each, so
    features computed from one size's rows serve another's."""
    if derived is None or index.content_hash is None:
        return None
    samples = [*index.train, *(index.val or []), *((index.test or []) if with_test else [])]
    started = time.perf_counter()
    decoded, made = decoded_images(derived, index.content_hash, [s.path for s in samples],
                                   index.root, prep, size, owner,
                                   part="all" if with_test else "fit")
    log.info("%s %d images at %d px in %.1f s", "decoded" if made else "reused the decoded",
             len(samples), size, time.perf_counter() - started)
    return decoded


def _stored_for(spec: FineTuneSpec) -> str:
    """The augmentation the training images are stored for: the one asked for, else the one
    a fine-tuning stage will use. Crops then come from the larger stored image, as with an
    explicit augment, not from the centre crop (bench/defaults.py: digits gained from it)."""
    if spec.augment != "auto":
        return spec.augment
    if not two_stage(spec):
        return "none"
    return rules.augment(PRESETS[spec.preset], backbone_trains=True,
                         epochs=int(spec.epochs)).value


def _build_setup(index: ImageFolderIndex, spec: FineTuneSpec, train_samples: list[Sample],
                 val_samples: list[Sample], *, device: str | None,
                 derived: DerivedStore | None = None, owner: str | None = None,
                 cache_features: bool = True, task: Task = TASKS["single_label"]) -> RunSetup:
    """Backbone, head and data sources on the chosen device, ready for the first stage."""
    torch_device = resolve_device(device)
    check_memory(spec, torch_device, num_classes=len(index.classes),
                 num_images=len(train_samples) + len(val_samples))
    precision = resolve_precision(spec.mixed_precision, torch_device)
    configure_backends(torch_device)
    torch.manual_seed(spec.seed)
    size = spec.image_size if isinstance(spec.image_size, int) else None
    backbone = create_backbone(spec.backbone, pretrained=spec.pretrained,
                               weights_path=spec.weights_path, image_size=size)
    torch.manual_seed(spec.seed)  # the head's init must not depend on how the backbone was built
    model = FineTuneModel(backbone.model,
                          build_head(backbone.num_features, len(index.classes), spec.head))
    model = channels_last(model.to(torch_device))
    prep = backbone.preprocessing
    decoded = _decoded(index, prep, prep.input_size, derived=derived, owner=owner)
    train_size = stored_size(prep, _stored_for(spec))
    # Larger images for augmented crops are only ever trained on: no test images among them.
    train_decoded = decoded if train_size == prep.input_size else \
        _decoded(index, prep, train_size, derived=derived, owner=owner, with_test=False)
    num_classes = len(index.classes)
    train_source = ImageSource([s.path for s in train_samples],
                               task.targets(train_samples, num_classes),
                               prep, train_size, decoded=train_decoded, root=index.root)
    val_source = ImageSource([s.path for s in val_samples], task.targets(val_samples, num_classes),
                             prep, prep.input_size, decoded=decoded, root=index.root)
    weights = (task.balanced_weights(train_source.labels, num_classes)
               if spec.class_weights == "balanced" and len(train_source) else None)
    return RunSetup(backbone, model, prep, precision, train_source, val_source, weights,
                    cache_features=cache_features, decoded=decoded, derived=derived, owner=owner,
                    fit_rows=range(len(index.train) + len(index.val or [])), task=task)


def check_memory(spec: FineTuneSpec, device: torch.device, *, num_classes: int,
                 num_images: int) -> None:
    """Refuse, with the numbers, a run that would not fit the device's memory."""
    capacity = device_memory_bytes(device)
    needed = memory.estimate(spec, num_classes=num_classes, num_images=num_images,
                             image_size=spec.image_size if isinstance(spec.image_size, int)
                             else backbone_size(spec.backbone),
                             decode_cache_bytes=engine_settings().decode_cache_bytes)
    if capacity is None or needed is None or needed.total_bytes <= capacity * MEMORY_HEADROOM:
        return
    raise ResourceError(
        f"this run needs {needed.describe()} but the {device.type} has "
        f"{capacity / 2**30:.1f} GB; lower batch_size or image_size, or freeze more of the "
        "backbone (freeze.strategy head_only or last_n_blocks)")


def _result(run: TrainingRun, backbone: Backbone, index: ImageFolderIndex, progress: Progress,
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
                                                    "val_loss", "val_accuracy", "val_map")
                      if k in best_row or k != "val_map"},
        stopped_early=stopped_early, device=str(run.device), precision=run.precision.name,
        num_train=num_train, num_val=num_val, skipped=index.skipped,
        dataset_hash=index.content_hash, evaluation=evaluation, seconds=seconds,
        task=run.task.name,
    )
