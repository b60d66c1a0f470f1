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
from ftune.models.recipe.choices import Choices
from ftune.models.spec import FineTuneSpec, PseudoLabelSpec
from ftune.models.training.checkpoint import (
    ROUNDS_FOLDER,
    round_checkpoint,
    save_best_weights,
    weights_to_save,
)
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
            callbacks.on_stage("pretrain", 0, 0)  # 0: the fine-tuning epochs are unchanged

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
                        unlabeled: list[Sample], resume: str | Path | None = None) -> None:
    """Label, keep the confident, train again from the best weights; the best on val (which
    pseudo-labels never enter) across all rounds is kept. A round's epochs are checkpointed
    with the images it labelled: resumed (from ``resume``), a run goes on in the round it
    was in (one whose epochs were all done ends at once) and repeats no earlier round."""
    config, setup = spec.pseudo_labels, stages.setup
    if not config.rounds or not unlabeled or stages.out_of_time:
        return
    folder = stages.ckpt_dir / ROUNDS_FOLDER if stages.ckpt_dir is not None else None
    state = _resumed_round(stages, resume)
    rounds: list[dict] = state["pseudo_labels"]["rounds"] if state else []
    for number in range(state["pseudo_labels"]["round"] if state else 1, config.rounds + 1):
        if setup.callbacks.on_stage is not None:
            setup.callbacks.on_stage("pseudo_labels", 0, 0)
        if state is not None:  # labelled by the attempt that was cut off
            indices, labels = state["pseudo_labels"]["indices"], state["pseudo_labels"]["labels"]
        else:
            indices, labels = _label_round(stages, config, unlabeled, rounds, len(train))
            if not indices:
                break
            _start_round(stages, folder)
        chosen = [unlabeled[i] for i in indices]
        setup.train_source = ImageSource(
            [s.path for s in train] + [s.path for s in chosen],
            [s.label for s in train] + labels, setup.prep, setup.train_source.size)
        again = stages.another_pass(folder)
        again.extra = {"pseudo_labels": {"round": number, "rounds": rounds,
                                         "indices": indices, "labels": labels}}
        again.run_all(None, state)
        state = None
        stages.best_state, stages.best_run = again.best_state, again.best_run
        stages.backbone_as_built = again.backbone_as_built
        if again.out_of_time:
            break


def _label_round(stages: StageRunner, config: PseudoLabelSpec, unlabeled: list[Sample],
                 rounds: list[dict], num_train: int) -> tuple[list[int], list[int]]:
    """The next round's images and labels, from the best weights so far; records the round."""
    setup = stages.setup
    if stages.best_state is not None:
        setup.model.load_state_dict(stages.best_state)
    indices, labels, counts = select_confident(_probabilities(setup, unlabeled),
                                               config.threshold, config.max_per_class)
    rounds.append({"round": len(rounds) + 1, "images": len(indices),
                   "per_class": dict(zip(stages.classes, counts, strict=True)),
                   "first_epoch": len(stages.progress.history) + 1})
    setup.choices.record("pseudo_labels", rules.pseudo_labels(rounds, config.threshold,
                                                              num_train))
    setup.choices.notify()
    return indices, labels


def _start_round(stages: StageRunner, folder: Path | None) -> None:
    """Before a round's first epoch: its folder holds the best weights it starts from (a
    resumed round finds them there, as a resumed run does its own)."""
    if folder is None or not stages.writes or stages.best_state is None:
        return
    save_best_weights(folder, weights_to_save(stages.best_state, stages.backbone_as_built))


def _resumed_round(stages: StageRunner, resume: str | Path | None) -> dict | None:
    """The checkpoint of the round a resumed run was in, with the choices and the time spent
    until then restored; None when the run had not begun its rounds (or is not resumed, or
    keeps no checkpoints: a resumed round reads its best weights from where it writes)."""
    if resume is None or stages.ckpt_dir is None:
        return None
    state = round_checkpoint(resume, stages.progress.history)
    if state is None:
        return None
    made, choices = Choices(state["resolved"]), stages.setup.choices
    for name in made.to_dict():
        if name != "devices":  # this attempt's, as fit recorded them
            choices.record(name, made.choice(name))
    choices.notify()
    if stages.budget.spent_before:  # counted when the budget is not the job's run time left
        stages.budget.spent_before = float(state["budget_spent_s"])
    log.info("resuming pseudo-labelling round %d", state["pseudo_labels"]["round"])
    return state
