"""The pretraining stage of ``fit``: adapt the backbone on the user's unlabelled images (and
the training images without their labels), or reuse a backbone adapted the same way by an
earlier job, from the derived store."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ftune.models.backbones import Backbone
from ftune.models.data.discover import Sample
from ftune.models.data.source import ImageSource
from ftune.models.derived.features import backbone_identity
from ftune.models.derived.store import DerivedStore
from ftune.models.errors import DatasetError
from ftune.models.pretrain.loop import PretrainRun
from ftune.models.spec import FineTuneSpec, PretrainSpec
from ftune.models.training.runtime import Precision

KIND = "adapted"
WEIGHTS = "backbone.pt"
HISTORY = "history.json"


@dataclass
class Adapted:
    key: str | None  # the store's key; None when it could not be shared (no store, no hash)
    history: list[dict]  # the pretraining epochs' rows (of the job that made it)
    reused: bool


def pretraining_images(train: list[Sample], unlabeled: list[Sample]) -> list[Sample]:
    """The unlabelled images and the training images, labels dropped; never val or test
    (their copies were already left out of ``unlabeled``)."""
    return [Sample(s.path, -1, s.sha256) for s in [*unlabeled, *train]]


def adapted_key(pretrain: PretrainSpec, *, seed: int, identity: str, images: list[Sample],
                size: int, precision: str) -> str | None:
    """Same pretraining spec, seed, backbone, size and images: the same adapted backbone
    (the seed matters even for a pretrained backbone: it orders batches and masks)."""
    if any(s.sha256 is None for s in images):
        return None
    digest = hashlib.sha256()
    for sha in sorted(s.sha256 or "" for s in images):
        digest.update(sha.encode())
    payload = [pretrain.model_dump(mode="json"), seed, identity, size, precision,
               digest.hexdigest()]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:32]


def adapt_backbone(run: PretrainRun, images: list[Sample], *, size: int,
                   store: DerivedStore | None, owner: str | None,
                   on_start: Callable[[], None] | None = None) -> Adapted:
    """Adapt ``run.backbone`` in place (from the store when it holds this adaptation)."""
    if not images:
        raise DatasetError("pretrain.method needs unlabelled images: add an unlabeled/ "
                           "folder to the dataset, or name an unlabelled dataset")
    backbone = run.backbone
    identity = (backbone_identity(backbone.name, backbone.weights_source)
                or f"{backbone.name}|random")
    key = adapted_key(run.spec, seed=run.seed, identity=identity, images=images, size=size,
                      precision=run.precision.name)
    source = ImageSource([s.path for s in images], [0] * len(images),
                         backbone.preprocessing, size)
    if store is None or key is None:
        if on_start is not None:
            on_start()
        return Adapted(None, run.run(source), reused=False)
    made_history: list[dict] = []

    def make(folder: Path) -> None:
        if on_start is not None:
            on_start()
        made_history.extend(run.run(source))
        torch.save(backbone.model.state_dict(), folder / WEIGHTS)
        (folder / HISTORY).write_text(json.dumps(made_history))

    def open_entry(folder: Path) -> list[dict]:
        state = torch.load(folder / WEIGHTS, map_location=run.precision.device,
                           weights_only=True)
        backbone.model.load_state_dict(state)
        return json.loads((folder / HISTORY).read_text())

    history, made = store.build_and_open(KIND, key, make, open_entry, owner)
    backbone.model.eval()
    return Adapted(key, history, reused=not made)


def new_run(spec: FineTuneSpec, backbone: Backbone, precision: Precision, *,
            should_stop: Callable[[], bool] | None, on_epoch: Callable[[dict], None] | None,
            checkpoint_dir: Path | None) -> PretrainRun:
    return PretrainRun(backbone, spec.pretrain, precision, spec.seed, should_stop=should_stop,
                       on_epoch=on_epoch,
                       checkpoint_dir=checkpoint_dir / "pretrain" if checkpoint_dir else None)
