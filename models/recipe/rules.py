"""The auto rules, one function each: a value and the reason, in words a user can check.

Pure functions of what is known when the choice is made: the dataset's statistics and the
preset at submit (``resolve.py`` makes those, without torch, in the API), and in the engine
what it measured (the range test, timed steps, the device, what pretraining did). The same
data and seed always give the same choices. Whoever makes a choice records it in a
``Choices`` (``choices.py``), which reports it to the job.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from ftune.models.recipe.presets import Preset
from ftune.models.recipe.stats import DatasetStats

# Balanced class weights from this largest-to-smallest class ratio on.
RARE_LABEL = 10  # multi-label: a label on fewer than 1 image in this many is rare
IMBALANCE_FOR_WEIGHTS = 3.0
# Small images are upscaled: pretrained features need some pixels per object. Measured with
# bench/defaults.py --sizes (frozen-feature probe, held-out accuracy at 64/96/128/224 px):
# animal-mnist (28 px) 0.932/0.952/0.966/0.979, digits (32 px) 0.920/0.930/0.936/0.922.
# 4x (at least 128 px) is the best for a frozen backbone on digits and most of the gain on
# animal-mnist, but costs 1.8x the compute of 96 px, and fine-tuning recovers the difference
# (bench/defaults.py: {} at 128 px took 1.25x a full fine-tune's time at 96 px for less
# accuracy). So fast and balanced take 3x (at least 96 px), best takes 4x (at least 128 px).
UPSCALE = {"fast": (3, 96), "balanced": (3, 96), "best": (4, 128)}
SIZE_STEP = 32
# Fine-tuning epochs: about 20,000 images seen in all on a mid-sized set, more passes on less.
FINETUNE_IMAGES = 20_000
MIN_FINETUNE_EPOCHS, MAX_FINETUNE_EPOCHS = 2, 12
# Multi-label sets get twice the fine-tuning passes. Measured in process on bench/multilabel.py's
# mosaics (2,400 training and 1,000 test images, 20 labels): 3 epochs (the single-label rule)
# mAP 0.9901, 6 epochs 0.9948 (which also turns on crop augmentation, from 6 epochs); a
# hand-written fine-tune of every layer for 13 epochs reached 0.9940.
MULTI_LABEL_EPOCHS = 2.0
# Room left for evaluation and saving when a budget comes from the job's run-time limit.
LIMIT_SHARE = 0.8
HEAD_LR = (1e-4, 1e-1)  # the range test's pick is kept within this
MAX_FINETUNE_LR = 1e-3
# One rate for the stages that train (the head keeps its range-tested rate). Measured in
# process against 0.7 (the top stage at 0.7x, the next at 0.49x, ...): on animal-mnist 2
# stages 0.965 against 0.961; on digits 3 stages 0.958/0.960 against 0.942/0.932 (seeds 0
# and 1); 0.85 gave 0.950 on digits. With so few stages training, lower rates only slow them.
LAYER_DECAY = None
HEAD_DROPOUT = 0.2  # while backbone stages train; none for a head alone on cached features
# Warmup for the fine-tuning stage: half an epoch ramps the new rates in gently.
FINETUNE_WARMUP_EPOCHS = 0.5
DEFAULT_PATIENCE = 3  # an explicit freeze strategy with patience auto
PRETRAIN_STAGES = 2  # pretrain.stages auto: the top two adapt, the rest keep ImageNet's


class Choice(NamedTuple):
    value: Any
    why: str
    # Facts stored beside the value and the reason (pretraining's key, images and losses).
    details: Mapping[str, Any] | None = None

    def to_dict(self) -> dict:
        return {"value": self.value, **(self.details or {}), "why": self.why}


def image_size(median_short_side: int | None, backbone_size: int,
               preset: str = "balanced") -> Choice:
    """The backbone's own size for photos; small images are upscaled 3x at most (at least
    96 px; 4x and 128 px with preset best)."""
    if median_short_side is None:
        return Choice(backbone_size, f"the backbone's pretrained size ({backbone_size} px); "
                      "the images' sizes are unknown")
    factor, smallest = UPSCALE[preset]
    wanted = SIZE_STEP * math.ceil(factor * median_short_side / SIZE_STEP)
    size = min(backbone_size, max(smallest, wanted))
    if size == backbone_size:
        return Choice(size, f"median image short side {median_short_side} px: the "
                      f"backbone's pretrained size ({backbone_size} px)")
    saving = (backbone_size / size) ** 2
    return Choice(size, f"median image short side {median_short_side} px: upscaled at most "
                  f"{factor}x (at least {smallest} px, preset {preset}) instead of the "
                  f"backbone's {backbone_size} px, {saving:.1f}x less compute; larger adds "
                  "little to such small images")


def class_weights(imbalance_ratio: float | None) -> Choice:
    if imbalance_ratio is not None and imbalance_ratio >= IMBALANCE_FOR_WEIGHTS:
        return Choice("balanced", f"largest class has {imbalance_ratio:.1f}x the images of the "
                      f"smallest (>= {IMBALANCE_FOR_WEIGHTS:g}): each class weighs the same "
                      "in the loss")
    shown = "one class size" if imbalance_ratio is None else f"ratio {imbalance_ratio:.1f}"
    return Choice("none", f"classes are balanced enough ({shown} < "
                  f"{IMBALANCE_FOR_WEIGHTS:g}:1)")


def positive_weights(positives: dict[str, int], images: int) -> Choice:
    """Multi-label class_weights auto: weigh a rare label's positives up when some label is on
    fewer than 1 image in ``RARE_LABEL``."""
    if not positives or not images:
        return Choice("none", "no labels to weigh")
    rarest = min(positives, key=positives.__getitem__)
    share = positives[rarest] / images
    if share < 1 / RARE_LABEL:
        return Choice("balanced", f"the rarest label ({rarest}) is on {share:.1%} of the training "
                      f"images (< 1 in {RARE_LABEL}): each label's positives weigh "
                      "sqrt(negatives/positives) (at most 10), so rare labels are not learned "
                      "as always absent")
    return Choice("none", f"every label is on at least 1 in {RARE_LABEL} training images "
                  f"(the rarest, {rarest}, on {share:.1%}): positives and negatives weigh the "
                  "same")


def optimizer_name() -> Choice:
    return Choice("adam", "Adam: adapts each weight's step, so one learning rate suits the "
                  "head and the backbone")


def freeze_strategy(preset: Preset) -> Choice:
    if preset.finetune:
        return Choice("two_stage", "the head alone on cached features until validation stops "
                      "improving, then the top stages with it")
    return Choice("head_only", f"preset {preset.name}: the head alone, on cached features")


def stages_to_train(num_train: int, preset: Preset, num_stages: int | None = None) -> Choice:
    """How many top backbone stages the second stage trains: one on small data, which more
    would overfit; three from 500 images."""
    if not preset.finetune:
        return Choice(0, f"preset {preset.name}: the head alone, on cached features")
    # Measured with bench/defaults.py's data in process: 3 stages beat 2 on animal-mnist
    # (0.971 against 0.965, 2,400 images) and digits (0.958/0.960 against 0.954/0.952, 1,040).
    base = 1 if num_train < 500 else 3
    n = base + preset.extra_stages
    if num_stages is not None:
        n = min(n, num_stages)
    return Choice(n, f"{num_train} training images, preset {preset.name}: the top {n} "
                  "stage(s) train in the second stage; fewer overfit small data")


def stages_within(planned: Choice, num_stages: int) -> Choice:
    """The stages to train chosen at submit, capped by the backbone's stage count (known
    once it is built); the reason is kept as given."""
    return planned._replace(value=min(int(planned.value), num_stages))


def finetune_epochs(num_train: int, preset: Preset, multi_label: bool = False) -> Choice:
    scale = preset.epoch_scale * (MULTI_LABEL_EPOCHS if multi_label else 1.0)
    passes = math.sqrt(FINETUNE_IMAGES / max(1, num_train)) * scale
    n = min(MAX_FINETUNE_EPOCHS, max(MIN_FINETUNE_EPOCHS, round(passes)))
    task = (f", {MULTI_LABEL_EPOCHS:g}x for a multi-label set: several labels per image, "
            "each often a small part of it, take more passes to learn" if multi_label else "")
    return Choice(n, f"at most {n} fine-tuning epochs for {num_train} training images "
                  f"(preset {preset.name}{task}); early stopping and the time budget may end "
                  "it sooner")


def head_epochs(preset: Preset) -> Choice:
    return Choice(preset.head_max_epochs, f"head epochs on cached features cost milliseconds: "
                  f"up to {preset.head_max_epochs}, until val loss stops improving for "
                  f"{preset.head_patience}")


def finetune_epochs_in_budget(planned: int, epoch_s: float, left_s: float) -> Choice:
    """The fine-tuning epochs that fit the time budget left, from an epoch's timed cost."""
    epochs = min(planned, max(0, int(left_s // epoch_s)))  # the budget may be spent already
    why = (f"{epoch_s:.1f} s per epoch (timed on the first batches), "
           f"{max(0.0, left_s):.0f} s of the time budget left")
    if epochs == planned:
        return Choice(epochs, why + f": all {planned} planned fit")
    return Choice(epochs, why + (f": {epochs} of the {planned} planned fit" if epochs else
                                 ": no fine-tuning epoch fits, the head alone is kept"))


def time_budget(preset: Preset, time_budget_s: float | None,
                limit_s: float | None) -> Choice:
    budget, source = ((time_budget_s, "the spec's time_budget_s") if time_budget_s is not None
                      else (preset.budget_s, f"preset {preset.name}'s budget"))
    if limit_s is not None and budget > LIMIT_SHARE * limit_s:
        return Choice(round(LIMIT_SHARE * limit_s, 1),
                      f"{source} ({budget:g} s) capped at {LIMIT_SHARE:.0%} of the job's "
                      f"run-time limit ({limit_s:g} s)")
    return Choice(budget, source)


def budget_spent(budget: Choice, epoch: int, next_epoch_s: float) -> Choice:
    """The time budget's choice once it has ended training: the reason says where."""
    return budget._replace(why=f"{budget.why}; it ended training after epoch {epoch}, since "
                           f"another epoch (~{next_epoch_s:.0f} s) would not fit")


def augment(preset: Preset, backbone_trains: bool, epochs: int) -> Choice:
    """The preset's augmentation while backbone stages train for enough epochs (presets.py);
    none for fewer, or for a frozen backbone."""
    if not backbone_trains:
        return Choice("none", "the backbone is frozen: features are computed once and cached")
    if epochs < preset.augment_from_epochs:
        return Choice("none", f"{epochs} epoch(s) of fine-tuning, fewer than "
                      f"{preset.augment_from_epochs} (preset {preset.name}): too few passes "
                      "over the images for augmentation to pay, and without it the frozen "
                      "stages run once per image instead of at every step")
    return Choice(preset.augment, f"backbone stages train for {epochs} epochs: "
                  f"{preset.augment} augmentation (preset {preset.name}) against overfitting")


def augment_cut(preset: Preset, epochs: int) -> Choice:
    """No augmentation once the time budget holds fewer fine-tuning epochs than it needs."""
    return Choice("none", f"the time budget holds {epochs} fine-tuning epoch(s) with "
                  f"{preset.augment} augmentation, fewer than {preset.augment_from_epochs} "
                  f"(preset {preset.name}): too few passes for it to pay, so none, and the "
                  "frozen stages run once per image, which may fit more epochs")


def warmup_epochs(asked: float, epochs: int) -> float:
    """The fine-tuning stage's warmup with schedule auto: the spec's, else half an epoch
    (at most half the epochs)."""
    return asked or min(FINETUNE_WARMUP_EPOCHS, epochs / 2)


def schedule(warmup: float) -> Choice:
    return Choice("cosine", f"{warmup:g} epoch(s) of linear warmup, then cosine decay to zero")


def patience(stage: str, preset: Preset, epochs: int) -> Choice:
    """Early stopping's patience for a stage ("head", "finetune" or "train", the one stage
    of an explicit freeze strategy)."""
    if stage == "head":
        return Choice(preset.head_patience, f"preset {preset.name}: head epochs on cached "
                      "features are cheap, so it waits long for val to improve")
    if stage == "finetune":
        # Its cosine schedule's last epochs, at the lowest rates, are usually its best, and
        # its first ones are often below the head's best: it runs to the end of its plan.
        return Choice(max(preset.finetune_patience, epochs), "the fine-tuning stage runs "
                      "its cosine schedule to the end: its last epochs are usually its best")
    return Choice(DEFAULT_PATIENCE, "an explicit freeze strategy: the usual patience")


# A fine-tuning stage is judged once it has run this many epochs and has this many left: its
# first epochs, from a new head, are often below the head stage's best.
JUDGE_FINETUNE_AFTER, JUDGE_FINETUNE_LEFT = 3, 2


def finetune_futile(stage: list[float], before: list[float], planned: int, *,
                    metric: str = "val_loss", higher_is_better: bool = False) -> Choice | None:
    """Whether a fine-tuning stage should stop because it is clearly not going to beat the
    stages before it (``stage``, ``before``: their values of ``metric`` per epoch). It stops
    when its best is still worse than theirs and, at the pace its best improved over its
    last two epochs, the epochs left would not close the gap: an optimistic straight line,
    since its cosine rate only falls from there. None: it goes on."""
    done, left = len(stage), planned - len(stage)
    if done < JUDGE_FINETUNE_AFTER or left < JUDGE_FINETUNE_LEFT:
        return None
    sign = -1.0 if higher_is_better else 1.0  # below: lower is better
    best, target = min(sign * v for v in stage), min(sign * v for v in before)
    gap, pace = best - target, max(0.0, min(sign * v for v in stage[:-2]) - best) / 2
    if gap <= 0 or pace * left >= gap:
        return None
    name = metric.replace("_", " ")
    return Choice(done, f"fine-tuning stopped after {done} of its {planned} epochs: its best "
                  f"{name} {sign * best:.4g} was {gap:.3g} worse than the best before it "
                  f"({sign * target:.4g}, the head trained alone) and improved {pace:.3g} per "
                  f"epoch over its last two, too slow to close the gap in the {left} epochs "
                  "left; the model before fine-tuning is kept")


# The head alone is enough when it classifies every val image right and there are enough of
# them for that to mean something: all of 30 right puts its error below 10% with 95%
# confidence (the rule of three). Fine-tuning could then only make it surer of answers it
# already gets right. Measured in process on bench/defaults.py's faces (lfw_subset, 32 val
# images) over 6 held-out draws: the head got every val image right on 3, and held-out
# accuracy there was 1.000/1.000/0.975 for the head alone against 1.000/1.000/0.950
# fine-tuned (12 epochs, about 70% of the run); on 300 to 1,200 digits (15 to 60 a class) it
# never did (val accuracy 0.80 to 0.93), and fine-tuning added up to 5 points.
HEAD_SUFFICES_MIN_VAL = 30


def head_suffices(val_accuracy: float, num_val: int, preset: Preset) -> Choice | None:
    """No fine-tuning (0 epochs) when the head stage's best model classifies every one of
    enough val images right, for presets that allow it; None: fine-tuning goes ahead."""
    if not preset.head_may_suffice or num_val < HEAD_SUFFICES_MIN_VAL or val_accuracy < 1:
        return None
    return Choice(0, f"no fine-tuning: the head trained alone classifies all {num_val} val "
                  "images right, so fine-tuning has nothing measurable to improve (with "
                  f"{HEAD_SUFFICES_MIN_VAL} or more val images; preset {preset.name}); "
                  "preset best fine-tunes anyway")


def head_lr(suggested: float, how: str) -> Choice:
    low, high = HEAD_LR
    lr = min(high, max(low, suggested))
    return Choice(float(f"{lr:.3g}"), how + ("" if lr == suggested else
                                             f", kept within [{low:g}, {high:g}]"))


def finetune_lr(head: float) -> Choice:
    lr = min(MAX_FINETUNE_LR, head)
    return Choice(float(f"{lr:.3g}"), f"the head's rate ({head:.3g}), at most "
                  f"{MAX_FINETUNE_LR:g}: pretrained features are adjusted, not overwritten")


def finetune_head() -> Choice:
    # Measured in process on bench/defaults.py's data (1 torch thread), held-out accuracy
    # fine-tuning from the head stage's head against from a new one: digits
    # 0.958/0.966/0.966 against 0.976/0.974/0.976 (seeds 0-2), animal-mnist 0.972/0.964
    # against 0.984/0.976 (seeds 0, 1), 300 animal-mnist images 0.900/0.895/0.897 against
    # 0.907/0.903/0.902.
    return Choice("new", "the fine-tuning stage starts from a new head, as the first one was "
                  "initialised: a head already trained leaves the backbone small gradients, "
                  "so it adapts less (measured worse on both benchmark datasets); the head "
                  "stage's model is kept if fine-tuning does not beat it")


def layer_decay() -> Choice:
    return Choice(LAYER_DECAY, "one rate for the backbone stages that train (at most "
                  f"{MAX_FINETUNE_LR:g}), the head at its tested rate: a decay per stage "
                  "(0.7, 0.85) measured worse when only the top stages train")


def refit(asked: bool | str, *, head_alone_cached: bool, val_carved: bool) -> bool:
    """Whether the head is trained again on train+val once its epochs are chosen: asked, or
    auto when only the head trains, on cached features, and val came out of the training
    images (an explicit val split is the user's to keep held out)."""
    if asked is False or not head_alone_cached:
        return False
    return asked is True or val_carved


def no_refit_multi_label() -> Choice:
    """refit auto on a multi-label run that would otherwise refit."""
    return Choice(False, "multi-label: each class's threshold and the temperature are chosen "
                  "on val, and a head trained again on val would no longer match them; the "
                  "head trained on train alone is kept (refit: true asks for it anyway)")


def refit_choice(images: int, epochs: int, *, capped: bool) -> Choice:
    """``capped``: the head's best epoch was the last its stage may run, so its limit, not
    early stopping, set the epochs."""
    chosen = (f"the {epochs} epoch(s) its stage may run (val loss was still improving at the "
              "last)" if capped else f"the {epochs} epoch(s) early stopping chose")
    return Choice(True, f"the head trained alone on cached features, so it was trained "
                  f"again on train+val ({images} images) for {chosen}; val metrics are from "
                  "the model before this refit")


def mixed_precision(device_type: str, bf16_supported: bool) -> Choice:
    """For mixed_precision auto: autocast on GPUs, plain float32 on CPUs."""
    if device_type != "cuda":
        return Choice("off", "float32: on CPUs autocast is usually slower than float32 "
                      "kernels")
    if bf16_supported:
        return Choice("bf16", "bf16 autocast: the GPU supports it, and it needs no loss "
                      "scaling")
    return Choice("fp16", "fp16 autocast with loss scaling: the GPU has no bf16")


# Images per device below which a second GPU costs more in synchronisation than it saves.
IMAGES_PER_DEVICE = 500


def devices(asked: int | str, available: int, *, device_type: str, trains_backbone: bool,
            num_train: int, batch_size: int, uses_unlabeled: bool) -> Choice:
    """How many of the worker's devices a job trains on (``asked``: the spec's field)."""
    if asked != "auto":
        return Choice(int(asked), f"asked for {asked}")
    if available <= 1:
        return Choice(1, "the worker has one device")
    if device_type != "cuda":
        return Choice(1, "CPU ranks share the same cores: one process uses them as well "
                      "(bench/devices.py)")
    if uses_unlabeled:
        return Choice(1, "pretraining and pseudo-labels run on one device")
    if not trains_backbone:
        return Choice(1, "only the head trains, on cached features: one device does it in "
                      "moments")
    useful = min(available, num_train // IMAGES_PER_DEVICE, batch_size // 2)
    if useful <= 1:
        return Choice(1, f"{num_train} training images: fewer than {IMAGES_PER_DEVICE} per "
                      "device would spend more on synchronising than they save")
    return Choice(useful, f"{useful} of the worker's {available} GPUs: {num_train} training "
                  f"images, at least {IMAGES_PER_DEVICE} per device")


def sync_batchnorm(asked: bool | str, device_type: str) -> Choice:
    """Whether BatchNorm statistics span every device's share of a batch (several devices)."""
    if asked != "auto":
        return Choice(bool(asked), "asked for")
    if device_type == "cuda":
        return Choice(True, "BatchNorm over the whole batch: the run computes what one GPU "
                      "would, for two small all-reduces per layer and step")
    return Choice(False, "each CPU rank's own BatchNorm statistics, running statistics "
                  "averaged every epoch: synchronising every layer over gloo halved the "
                  "speed of two CPU ranks (bench/devices.py)")


def feature_cache(computed: bool) -> Choice:
    """Whether the frozen backbone's features were computed by this run or reused."""
    if computed:
        return Choice("computed", "frozen features of the training images computed once, "
                      "kept for later jobs with the same images, size, backbone and precision")
    return Choice("reused", "frozen features reused from an earlier job with the same images, "
                  "size, backbone and precision")


def head_dropout(head_alone: bool) -> Choice:
    if head_alone:
        return Choice(0.0, "the head trains alone on cached features: early stopping "
                      "regularises it, dropout would only slow it down (measured with "
                      "bench/defaults.py: it cost the fast preset accuracy)")
    return Choice(HEAD_DROPOUT, "backbone stages train: dropout before the classifier "
                  "against overfitting")


# Few labels: under this many training images in the smallest class; many unlabelled: at least
# as many as the labelled training images.
FEW_LABELS_PER_CLASS = 50
# What bench/unlabeled.py measured (10 labelled images per class, 3,000 unlabelled), in words.
UNLABELED_MEASURED = (
    "in bench/unlabeled.py (10 labelled images per class, 3 seeds), two rounds of "
    "pseudo_labels gained 6.8 points on animal-mnist and 9.6 on digits; pretrain autoencoder "
    "gained 4.8 on digits but lost 3.2 on animal-mnist; pretrain contrastive lost 4 to 15 "
    "points")


def unlabeled_advice(stats: DatasetStats, uses_unlabeled: bool) -> Choice | None:
    """With few labels and many unlabelled images, which option is expected to help."""
    counts = [n for n in stats.class_counts.values() if n > 0]
    if not counts or min(counts) >= FEW_LABELS_PER_CLASS or \
            stats.unlabeled < max(1, stats.num_train):
        return None
    used = "the spec uses them" if uses_unlabeled else "the spec uses none of them"
    return Choice("pseudo_labels", f"{min(counts)} labelled images in the smallest class and "
                  f"{stats.unlabeled} unlabelled ones ({used}): {UNLABELED_MEASURED}")


def pretrain_size(asked: int | str, input_size: int) -> Choice:
    if asked != "auto":
        return Choice(int(asked), "the spec's pretrain.image_size")
    return Choice(input_size, f"the size fine-tuning trains at ({input_size} px)")


def pretrain_stages(asked: int | str, num_stages: int) -> Choice:
    """How many top backbone stages learn while pretraining (never more than it has)."""
    wanted = PRETRAIN_STAGES if asked == "auto" else int(asked)
    return Choice(min(num_stages, wanted), f"the top {min(num_stages, wanted)} stage(s) "
                  "adapt; the rest keep their pretrained weights")


def pretrain(method: str, batchnorm: str, *, key: str | None, reused: bool, epochs: int,
             images: int, unlabeled: int, size: int, stages: int,
             losses: list[float]) -> Choice:
    """What pretraining did; ``images`` counts the unlabelled and the training images."""
    how = (f"reused the backbone adapted by an earlier job (adapted:{key})" if reused
           else f"adapted for {epochs} epoch(s)")
    kept = f"; kept for later jobs as adapted:{key}" if key and not reused else ""
    return Choice(method, f"{how} on {unlabeled} unlabelled and {images - unlabeled} training "
                  f"images (labels unused) at {size} px, the top {stages} stage(s) learning, "
                  "BatchNorm statistics adapting in "
                  + ("every stage" if batchnorm == "all" else "those") + kept,
                  {"key": key, "reused": reused, "images": images,
                   "unlabeled_images": unlabeled, "size": size, "stages": stages,
                   "loss": losses})


def pseudo_labels(rounds: list[dict], threshold: float, num_train: int) -> Choice:
    """The pseudo-labelling rounds so far (their images per class), and how they were chosen."""
    return Choice(rounds, f"unlabelled images predicted with probability >= {threshold:g}, "
                  f"the same number per class, added to the {num_train} training images for "
                  "another pass of the stages; never to validation")


def calibration_choice(kept: bool, temperature: list[float], why: str,
                       warnings: list[str] | None = None) -> Choice:
    """Temperature scaling after training (models.calibration): the temperature(s) kept, or
    none, and the validation ECE that decided it; ``warnings`` (a class keeping the 0.5
    threshold) go beside it."""
    details = {"warnings": warnings} if warnings else None
    if not kept:
        return Choice("none", why, details)
    return Choice(temperature[0] if len(temperature) == 1 else temperature, why, details)
