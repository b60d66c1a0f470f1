"""The mutable state of one training run and one epoch of it: freezing level, optimizer,
schedule step and the frozen-feature caches."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ftune.models.auto_fields import decided
from ftune.models.data.source import BatchSizes
from ftune.models.data.transforms import augment, center_crop_batch, normalize
from ftune.models.derived.features import SharedFeatures
from ftune.models.network import FineTuneModel
from ftune.models.parallel import ranks
from ftune.models.recipe import rules
from ftune.models.recipe.plan import StagePlan
from ftune.models.training.loop import (
    BatchHook,
    EpochStats,
    ValStats,
    evaluate,
    stop_if_asked,
    train_one_epoch,
)
from ftune.models.training.prefix_cache import PrefixCache, prefix_cache_budget
from ftune.models.training.run_setup import Callbacks, RunSetup
from ftune.models.training.runtime import as_channels_last, feature_batch_size
from ftune.models.tuning.freezing import (
    apply_freezing,
    backbone_is_frozen,
    set_train_mode,
    trainable_stage_count,
)
from ftune.models.tuning.frozen_prefix import split_frozen
from ftune.models.tuning.optimizers import create_optimizer
from ftune.models.tuning.param_groups import HEAD, join_order, unit_param_groups
from ftune.models.tuning.schedules import lr_multiplier

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


# Validating a head on cached features: one pass of a few thousand rows costs less than the
# Python overhead of many small batches (it was a tenth of a fast job on digits).
FEATURE_EVAL_BATCH = 4096


class TrainingRun:
    """Everything that changes while a run trains, and how one epoch of it goes."""

    def __init__(self, setup: RunSetup, plan: StagePlan, *, epoch_offset: int = 0,
                 model: FineTuneModel | None = None) -> None:
        """A run of ``plan``'s stage on ``setup``'s model (or on ``model``, a copy to time
        steps on), numbering its epochs from ``epoch_offset`` (rows span the stages)."""
        spec = plan.spec
        self.model = model if model is not None else setup.model
        self.spec, self.stages, self.prep = spec, setup.backbone.stages, setup.prep
        self.stage, self.epoch_offset = plan.name, epoch_offset
        self.precision, self.device = setup.precision, setup.precision.device
        # The sources as they are now: pseudo-labelling gives later runs a larger train one.
        self.train_source, self.val_source = setup.train_source, setup.val_source
        self.cache_features = setup.cache_features
        # Also checked while features are cached, which can take long before the first step.
        self.should_stop: Callable[[], bool] | None = setup.should_stop
        class_weights = setup.class_weights
        weight = class_weights.to(self.device) if class_weights is not None else None
        self.task = setup.task
        self.loss_fn = self.task.loss(weight, spec.label_smoothing)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.precision.needs_grad_scaler)
        self.best_state: dict | None = None
        self.step = 0
        self.world = ranks.current().world  # ranks that train together (one outside a group)
        self.samples_per_epoch = samples_per_epoch(len(self.train_source), spec.batch_size,
                                                   self.world)
        # Across ranks: BatchNorm over the whole batch, or each rank's share of it.
        sync = rules.sync_batchnorm(spec.sync_batchnorm, self.device.type)
        self.sync_batchnorm = bool(sync.value)
        if self.world > 1:
            setup.choices.record("sync_batchnorm", sync)
        self.steps_per_epoch = math.ceil(self.samples_per_epoch / spec.batch_size)
        self.total_steps = self.steps_per_epoch * decided(spec.epochs)
        self.warmup_steps = round(spec.schedule.warmup_epochs * self.steps_per_epoch)
        self._features: dict[str, torch.Tensor] = {}
        # Features of the whole dataset kept for other jobs too (when the setup has them).
        self.shared_features: Callable[[], SharedFeatures | None] | None = \
            setup.shared_features
        self.caching_s = 0.0  # spent computing cached features (once, not every epoch)
        # The frozen stages' outputs while only the top ones train, for this many trainable.
        self._prefix: tuple[int, PrefixCache | None] | None = None
        stages = self.stages
        self.n_trainable = trainable_stage_count(spec.freeze, 0, len(stages))
        apply_freezing(self.model, stages, self.n_trainable)
        groups = [g for unit in join_order(len(stages), self.n_trainable)
                  for g in unit_param_groups(self.model, stages, unit, spec.optimizer)]
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

    def remember_best(self) -> dict:
        self.best_state = {k: v.detach().to("cpu", copy=True)
                           for k, v in self.model.state_dict().items()}
        return self.best_state

    def epoch(self, epoch: int, callbacks: Callbacks) -> dict:
        """Train one epoch (0-based) and validate; returns the epoch's metrics row."""
        started = time.perf_counter()
        ranks.broadcast_module(self.model)  # rank 0's weights: the ranks cannot drift apart
        self.set_trainable(trainable_stage_count(self.spec.freeze, epoch, len(self.stages)))
        set_train_mode(self.model, self.n_trainable, self.spec.freeze.batchnorm)
        frozen = self.cache_features and backbone_is_frozen(self.n_trainable,
                                                             self.spec.freeze.batchnorm)
        use_train_cache = frozen and self.spec.augment == "none"
        prefix = None if frozen else self._prefix_cache()
        train_on_prefix = prefix is not None and self._prefix_ready(prefix, "train")
        stats = self._train(epoch, callbacks, use_train_cache,
                            prefix if train_on_prefix else None)
        if self.world > 1 and not use_train_cache and not self.sync_batchnorm:
            ranks.average_batchnorm(self.model)  # each rank's saw its shards only
        self.step += stats.steps
        val = self._validate(frozen, prefix)
        row = {
            "epoch": self.epoch_offset + epoch + 1,
            "stage": self.stage,
            "train_loss": stats.loss,
            "train_accuracy": stats.accuracy,
            "val_loss": val.loss if val else None,
            "val_accuracy": val.accuracy if val else None,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
            "grad_norm": stats.grad_norm,
            "stage_grad_norms": stats.stage_grad_norms,
            "trainable_stages": self.n_trainable,
            "trainable_params": sum(p.numel() for p in self.model.parameters()
                                    if p.requires_grad),
            "feature_cache": use_train_cache,
            "frozen_stage_cache": train_on_prefix,
        }
        if self.task.metric == "val_map":
            row["val_map"] = val.map if val else None
        return row

    def _prefix_cache(self) -> PrefixCache | None:
        """The frozen stages' output cache, when some stages train and the rest can run
        once per image: BatchNorm frozen and a backbone that splits there. Whether a split's
        outputs fit its budget is known once they are asked for (``_prefix_ready``)."""
        if not self.cache_features or self.spec.freeze.batchnorm != "frozen":
            return None
        if self._prefix is None or self._prefix[0] != self.n_trainable:
            split = split_frozen(self.model, self.stages, self.n_trainable)
            cache = None if split is None else PrefixCache(
                split, self.precision, prefix_cache_budget(self.device))
            self._prefix = (self.n_trainable, cache)
        return self._prefix[1]

    def _prefix_ready(self, prefix: PrefixCache, split: str) -> bool:
        """Whether ``split``'s frozen-stage outputs are cached (computing them if not)."""
        source = self.train_source if split == "train" else self.val_source
        if split == "train" and self.spec.augment != "none":
            return False  # augmented images are new every epoch
        before = prefix.seconds
        # Training images as the training steps see them (not augmented), val ones as stored.
        ready = prefix.outputs(split, len(source), lambda: self._image_batches(
            torch.arange(len(source)), training=split == "train", split=split,
            batch_size=feature_batch_size(self.device)), self.should_stop) is not None
        self.caching_s += prefix.seconds - before
        return ready

    def _train(self, epoch: int, callbacks: Callbacks, use_train_cache: bool,
               prefix: PrefixCache | None) -> EpochStats:
        """One epoch on cached features (the head alone), on the frozen stages' cached
        outputs (``prefix``), or on images."""
        order = self._order(epoch)
        # Image batches are sharded across ranks; a head on cached features trains on the
        # whole batch on every rank: its steps cost less than a collective would.
        sharded = self.world > 1 and not use_train_cache
        sizes: BatchSizes = self.spec.batch_size
        global_sizes = None
        if sharded:
            shards = ranks.shard_batches(order, self.spec.batch_size)
            order, sizes, global_sizes = shards.order, shards.sizes, shards.global_sizes
        if use_train_cache:
            module: nn.Module = self.model.head
            batches = self._feature_batches("train", order)
        elif prefix is not None:  # its training images' outputs are ready
            module = prefix.split.suffix
            batches = prefix.batches("train", order, sizes)
        else:
            module, batches = self.model, self._image_batches(order, training=True,
                                                              batch_size=sizes,
                                                              global_sizes=global_sizes)
        return train_one_epoch(
            module, batches, self.optimizer, loss_fn=self.loss_fn, precision=self.precision,
            scaler=self.scaler, first_step=self.step,
            lr_at_step=lambda s: lr_multiplier(self.spec.schedule.name, s, self.total_steps,
                                               self.warmup_steps),
            grad_groups=self.grad_groups(), grad_clip_norm=self.spec.grad_clip_norm,
            steps_in_epoch=self.steps_per_epoch,
            on_batch=_epoch_hook(self.epoch_offset + epoch, callbacks),
            should_stop=callbacks.should_stop, global_sizes=global_sizes,
            sync_batchnorm=self.sync_batchnorm,
        )

    def _validate(self, frozen: bool, prefix: PrefixCache | None) -> ValStats | None:
        if not len(self.val_source):
            return None
        self.model.eval()
        order = torch.arange(len(self.val_source))
        if frozen:  # the head alone, in eval mode: any batch size gives the same answer
            return evaluate(self.model.head,
                            self._feature_batches("val", order, FEATURE_EVAL_BATCH),
                            loss_fn=self.loss_fn, precision=self.precision, task=self.task)
        # Images are shared out among the ranks, and the sums taken over all of them.
        sharded, order = self.world > 1, ranks.shard(order)
        if prefix is not None and self._prefix_ready(prefix, "val"):
            return evaluate(prefix.split.suffix,
                            prefix.batches("val", order, self.spec.batch_size),
                            loss_fn=self.loss_fn, precision=self.precision, sharded=sharded,
                            task=self.task)
        return evaluate(self.model, self._image_batches(order, training=False, split="val"),
                        loss_fn=self.loss_fn, precision=self.precision, sharded=sharded,
                        task=self.task)

    def _order(self, epoch: int) -> torch.Tensor:
        return epoch_order(self.spec.seed, epoch, len(self.train_source), self.samples_per_epoch)

    def _image_batches(self, order: torch.Tensor, *, training: bool, split: str = "train",
                       batch_size: BatchSizes | None = None,
                       global_sizes: list[int] | None = None) -> Batches:
        """``global_sizes``: the batches are this rank's shards of global batches of these
        sizes; augmentations are drawn for the whole batch, as one process would."""
        source = self.train_source if split == "train" else self.val_source
        cuda = self.device.type == "cuda"
        batches = source.batches(order, batch_size or self.spec.batch_size, pin=cuda)
        for step, (images, labels, _) in enumerate(batches):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            batch = images.float()
            if training and self.spec.augment != "none":
                among = None
                if global_sizes is not None:  # draws for the whole batch: ours among them
                    among = (global_sizes[step], ranks.positions(global_sizes[step]))
                batch = augment(batch, self.prep.input_size, self.spec.augment, among=among)
            elif not training:  # features and validation see the centre, as val is stored
                batch = center_crop_batch(batch, self.prep.input_size)
            yield as_channels_last(normalize(batch, self.prep)), labels

    def _feature_batches(self, split: str, order: torch.Tensor,
                         batch_size: int | None = None) -> Batches:
        features, labels = self._cached_features(split)
        order = order.to(self.device)
        batch_size = batch_size or self.spec.batch_size
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield features[idx], labels[idx]

    def seconds_per_step(self, steps: int) -> float:
        """Median time of ``steps`` training steps (after one untimed): for planning epochs.
        The steps change this run's weights, so it is called on a throwaway copy."""
        set_train_mode(self.model, self.n_trainable, self.spec.freeze.batchnorm)
        batch = -(-self.spec.batch_size // self.world)  # a rank's shard of the batch
        order = self._order(0)[:(steps + 1) * batch]
        prefix = self._prefix_cache() if self.spec.augment == "none" else None
        module = self.model if prefix is None else prefix.split.suffix
        times = []
        for step in range(steps + 1):
            batches = self._image_batches(order[step * batch:(step + 1) * batch], training=True)
            if prefix is not None:  # the frozen stages run once per image, not every epoch
                with torch.no_grad(), self.precision.autocast():
                    batches = iter([(prefix.split.prefix(x), y) for x, y in batches])
            started = time.perf_counter()
            train_one_epoch(module, batches,
                            self.optimizer, loss_fn=self.loss_fn, precision=self.precision,
                            scaler=self.scaler, first_step=0, lr_at_step=lambda _: 1.0,
                            grad_groups=self.grad_groups())
            times.append(time.perf_counter() - started)
        return statistics.median(times[1:])

    def adopt_features(self, other: TrainingRun) -> None:
        """Reuse another run's cached features (same frozen backbone, same sources)."""
        self._features = other._features

    @property
    def backbone_frozen(self) -> bool:
        return backbone_is_frozen(self.n_trainable, self.spec.freeze.batchnorm)

    def has_cached(self, split: str) -> bool:
        return split in self._features

    def cached_features(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen backbone's features of a split (computed once), and its labels."""
        return self._cached_features(split)

    @torch.no_grad()
    def _cached_features(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self._features:
            started = time.perf_counter()
            source = self.train_source if split == "train" else self.val_source
            shared = self.shared_features() if self.shared_features is not None else None
            if shared is not None and source.stored_rows is not None:
                self._features[split] = shared.take(source.stored_rows).to(self.device)
                self._features[split + "_labels"] = source.labels.to(self.device)
                self.caching_s += time.perf_counter() - started
                return self._features[split], self._features[split + "_labels"]
            self.model.backbone.eval()
            chunks = []
            for batch, _ in self._image_batches(torch.arange(len(source)), training=False,
                                                split=split,
                                                batch_size=feature_batch_size(self.device)):
                stop_if_asked(self.should_stop)
                with self.precision.autocast():
                    chunks.append(self.model.backbone(batch).float())
            self._features[split] = torch.cat(chunks)
            self._features[split + "_labels"] = source.labels.to(self.device)
            self.caching_s += time.perf_counter() - started
        return self._features[split], self._features[split + "_labels"]


def samples_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """A final batch of one sample breaks BatchNorm in train mode: drop it. Across ranks,
    every rank needs two images of every batch: a final batch of fewer than two per rank
    goes."""
    if world > 1:
        rest = n % batch_size
        return n - rest if 0 < rest < 2 * world and n > rest else n
    return n - 1 if n % batch_size == 1 and n > 1 else n


def epoch_order(seed: int, epoch: int, n: int, keep: int) -> torch.Tensor:
    """The first ``keep`` of a shuffle of ``n`` samples. A generator of its own per epoch: the
    order depends only on (seed, epoch), so a resumed run and a feature-cached run see exactly
    the batches an uninterrupted run sees."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)[:keep]


def _epoch_hook(epoch: int, callbacks: Callbacks) -> BatchHook | None:
    """The per-batch callback with the epoch number (1-based) filled in."""
    hook = callbacks.on_batch_end
    if hook is None:
        return None

    def on_batch(step: int, steps: int, loss: float) -> None:
        hook(epoch + 1, step, steps, loss)

    return on_batch
