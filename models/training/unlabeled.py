"""What ``fit`` does with unlabelled images: adapt the backbone on them before fine-tuning
(``spec.pretrain``), and label them with the model to train again (``spec.pseudo_labels``).

Validation and test images never take part: unlabelled copies of any labelled image are
left out, pretraining sees only the training split, and pseudo-labelled images only ever
join the training source.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ftune.models.data.discover import ImageFolderIndex, Sample, without_copies
from ftune.models.data.source import ImageSource
from ftune.models.errors import DatasetError
from ftune.models.evaluation import predict_probabilities
from ftune.models.pretrain.stage import adapt_backbone, new_run, pretraining_images
from ftune.models.recipe import rules
from ftune.models.spec import FineTuneSpec
from ftune.models.training.run_setup import RunSetup
from ftune.models.training.stages import StageRunner

log = logging.getLogger(__name__)


def unlabeled_of(index: ImageFolderIndex, extra: ImageFolderIndex | None) -> list[Sample]:
    """The dataset's own unlabelled images and those of ``extra`` (a dataset of kind
    unlabeled), without copies of the labelled images or of each other."""
    labelled = {s.sha256 for s in [*index.train, *(index.val or []), *(index.test or [])]
                if s.sha256}
    return without_copies([*index.unlabeled, *(extra.unlabeled if extra else [])], labelled)


def require_unlabeled(spec: FineTuneSpec, unlabeled: list[Sample]) -> None:
    """A spec that needs unlabelled images fails at once, naming the field, without any."""
    if unlabeled or not spec.uses_unlabeled:
        return
    field = "pretrain.method" if spec.pretrain.method != "none" else "pseudo_labels.rounds"
    raise DatasetError(f"{field} needs unlabelled images, and there are none (copies of "
                       "labelled images do not count): add an unlabeled/ folder beside the "
                       "class folders or beside train/, or name a dataset of unlabelled "
                       "images")


def pretrain_stage(setup: RunSetup, spec: FineTuneSpec, train: list[Sample],
                   unlabeled: list[Sample], *, checkpoint_dir: Path | None) -> list[dict]:
    """Adapt the backbone (or reuse an adaptation); its epochs' rows. Records the choice."""
    if spec.pretrain.method == "none":
        return []
    callbacks = setup.callbacks
    size = rules.pretrain_size(spec.pretrain.image_size, setup.prep.input_size).value
    run = new_run(spec, setup.backbone, setup.precision, should_stop=callbacks.should_stop,
                  on_epoch=callbacks.on_pretrain_epoch, checkpoint_dir=checkpoint_dir)

    def on_start() -> None:
        if callbacks.on_stage is not None:
            callbacks.on_stage("pretrain", 0)  # 0: the fine-tuning epochs are unchanged

    images = pretraining_images(train, unlabeled)
    adapted = adapt_backbone(run, images, size=size, store=setup.derived, owner=setup.owner,
                             on_start=on_start)
    setup.adapted_key = adapted.key or "unshared"
    setup.choices.record("pretrain", rules.pretrain(
        spec.pretrain.method, spec.pretrain.batchnorm, key=adapted.key, reused=adapted.reused,
        epochs=len(adapted.history), images=len(images), unlabeled=len(unlabeled), size=size,
        stages=run.adapting_stages,
        losses=[round(row["pretrain_loss"], 4) for row in adapted.history]))
    setup.choices.notify()
    return adapted.history


def _probabilities(setup: RunSetup, samples: list[Sample]) -> torch.Tensor:
    """The model's class probabilities for ``samples``, as evaluation computes them."""
    prep = setup.prep
    source = ImageSource([s.path for s in samples], [0] * len(samples), prep, prep.input_size)
    return predict_probabilities(setup.model, source, prep, setup.precision.device,
                                 setup.precision, should_stop=setup.should_stop)


def select_confident(probabilities: torch.Tensor, threshold: float,
                     max_per_class: int | None) -> tuple[list[int], list[int], list[int]]:
    """(indices, labels, count per class): the images predicted with at least ``threshold``,
    the same number for every class that has any (the most confident first), so that
    pseudo-labels do not tilt the classes."""
    confidence, predicted = probabilities.max(dim=1)
    num_classes = probabilities.shape[1]
    by_class = []
    for cls in range(num_classes):
        idx = torch.nonzero((predicted == cls) & (confidence >= threshold)).flatten()
        by_class.append(idx[torch.argsort(confidence[idx], descending=True)].tolist())
    present = [len(found) for found in by_class if found]
    take = min(present) if present else 0
    if max_per_class is not None:
        take = min(take, max_per_class)
    indices = [i for found in by_class for i in found[:take]]
    labels = [int(predicted[i]) for i in indices]
    counts = [min(take, len(found)) for found in by_class]
    return indices, labels, counts


def pseudo_label_rounds(stages: StageRunner, spec: FineTuneSpec, *, train: list[Sample],
                        unlabeled: list[Sample]) -> None:
    """Label, keep the confident, train again from the best weights; the best on val (which
    pseudo-labels never enter) across all rounds is kept. Rounds are not checkpointed: a
    resumed job repeats them."""
    config, setup = spec.pseudo_labels, stages.setup
    if not config.rounds or not unlabeled or stages.out_of_time:
        return
    rounds: list[dict] = []
    for number in range(1, config.rounds + 1):
        if stages.best_state is not None:
            setup.model.load_state_dict(stages.best_state)
        if setup.callbacks.on_stage is not None:
            setup.callbacks.on_stage("pseudo_labels", 0)
        indices, labels, counts = select_confident(_probabilities(setup, unlabeled),
                                                   config.threshold, config.max_per_class)
        rounds.append({"round": number, "images": len(indices),
                       "per_class": dict(zip(stages.classes, counts, strict=True)),
                       "first_epoch": len(stages.progress.history) + 1})
        setup.choices.record("pseudo_labels",
                             rules.pseudo_labels(rounds, config.threshold, len(train)))
        setup.choices.notify()
        if not indices:
            break
        chosen = [unlabeled[i] for i in indices]
        setup.train_source = ImageSource(
            [s.path for s in train] + [s.path for s in chosen],
            [s.label for s in train] + labels, setup.prep, setup.train_source.size)
        again = stages.another_pass()
        again.run_all(None, None)
        stages.best_state, stages.best_run = again.best_state, again.best_run
        if again.out_of_time:
            break
