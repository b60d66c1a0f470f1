"""What every stage of a run shares (``RunSetup``): the backbone, the model being tuned, the
decoded data and the features shared with other jobs, the caller's ``Callbacks`` and the
record of the run's auto choices. Each stage's ``TrainingRun`` (run.py) is built from it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ftune.models.backbones import Backbone
from ftune.models.data.source import ImageSource
from ftune.models.data.transforms import normalize
from ftune.models.derived.decoded import DecodedImages
from ftune.models.derived.features import SharedFeatures, backbone_identity, shared_features
from ftune.models.derived.store import DerivedStore
from ftune.models.network import FineTuneModel
from ftune.models.preprocessing import Preprocessing
from ftune.models.recipe import rules
from ftune.models.recipe.choices import Choices
from ftune.models.tasks import TASKS, Task
from ftune.models.training.loop import stop_if_asked
from ftune.models.training.runtime import Precision, as_channels_last, feature_batch_size


@dataclass
class Callbacks:
    """The caller's hooks into a run: progress goes out through them, a stop request in."""

    on_epoch_end: Callable[[dict], None] | None = None  # gets the epoch's metrics row
    on_batch_end: Callable[[int, int, int, float], None] | None = None  # epoch, step, steps, loss
    should_stop: Callable[[], bool] | None = None  # checked at every batch boundary
    # Stage name, epochs planned in all (0: unchanged), the stage's own (0: not a training
    # stage, which runs no epochs).
    on_stage: Callable[[str, int, int], None] | None = None
    on_resolved: Callable[[dict], None] | None = None  # the auto choices made so far
    on_pretrain_epoch: Callable[[dict], None] | None = None  # a pretraining epoch's row


@dataclass
class RunSetup:
    """What every stage shares: the backbone, the model being tuned, the decoded data, and
    the caller's callbacks and the record of auto choices (``connect``)."""

    backbone: Backbone
    model: FineTuneModel
    prep: Preprocessing
    precision: Precision
    train_source: ImageSource
    val_source: ImageSource
    class_weights: torch.Tensor | None
    cache_features: bool = True  # a frozen backbone's features are computed once per stage
    callbacks: Callbacks = field(default_factory=Callbacks)
    choices: Choices = field(default_factory=Choices)
    decoded: DecodedImages | None = None  # the dataset's images, decoded once for all jobs
    derived: DerivedStore | None = None  # where features shared with other jobs are kept
    owner: str | None = None  # whose store entries this run makes
    # Set once an epoch has trained backbone weights: features are no longer the shared ones.
    backbone_changed: bool = False
    # Set when pretraining adapted the backbone: its features are shared under this key.
    adapted_key: str | None = None
    # The decoded rows of the images trained and validated on (test images come after them).
    fit_rows: range = range(0)
    task: Task = TASKS["single_label"]
    _shared: SharedFeatures | None = None
    _shared_rest: SharedFeatures | None = None  # the test images' features, when asked for

    def connect(self, callbacks: Callbacks, choices: Choices) -> None:
        """Stop when the caller asks; record (and report) choices made while training."""
        self.callbacks, self.choices = callbacks, choices

    @property
    def should_stop(self) -> Callable[[], bool] | None:
        """The caller's stop request, also checked while features are cached."""
        return self.callbacks.should_stop

    def shared_features(self) -> SharedFeatures | None:
        """The frozen backbone's features of the images trained and validated on, shared
        with the owner's other jobs on the same images, backbone and precision (computed
        into the store by the first; another tenant's entry is never found, so "reused"
        discloses nothing unless the operator shares the store)."""
        if self._shared is not None or self.backbone_changed:
            return None if self.backbone_changed else self._shared
        self._shared, made = self._open(self.fit_rows)
        if self._shared is not None:
            self.choices.record("feature_cache", rules.feature_cache(computed=made))
            self.choices.notify()
        return self._shared

    def shared_features_of_rows(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Features of decoded ``rows`` from the store, for a model whose backbone is as
        built (its best weights): the test images' entry is computed on first use. None
        when this run does not share features or the rows span both entries."""
        shared, decoded = self._shared, self.decoded
        if shared is None or decoded is None or not len(rows):
            return None
        if shared.covers(rows):
            return shared.take(rows)
        if self._shared_rest is None and self.fit_rows.stop < len(decoded.array):
            self._shared_rest, _ = self._open(range(self.fit_rows.stop, len(decoded.array)))
        rest = self._shared_rest
        return rest.take(rows) if rest is not None and rest.covers(rows) else None

    def _open(self, rows: range) -> tuple[SharedFeatures | None, bool]:
        """The store's entry for ``rows`` of the backbone as it is now, computed if absent
        (True when computed now); None when this run shares no features."""
        identity = backbone_identity(self.backbone.name, self.backbone.weights_source)
        if self.adapted_key is not None:  # "unshared": adapted where nothing can be shared
            identity = (None if self.adapted_key == "unshared"
                        else f"{identity or self.backbone.name}|adapted:{self.adapted_key}")
        if self.derived is None or self.decoded is None or identity is None or not len(rows):
            return None, False
        backbone, device, prep = self.model.backbone, self.precision.device, self.prep
        backbone.eval()

        @torch.no_grad()
        def extract(images: torch.Tensor) -> torch.Tensor:
            batch = as_channels_last(normalize(images.to(device).float(), prep))
            with self.precision.autocast():
                return backbone(batch)

        return shared_features(
            self.derived, self.decoded, rows, backbone=identity,
            precision=self.precision.name, extract=extract,
            batch_size=feature_batch_size(device),
            should_stop=lambda: stop_if_asked(self.should_stop), owner=self.owner)
