"""What went wrong in a run, and what to try: findings from the metrics history, gradient
norms and per-class recall, each with its evidence and an action.

No torch: the service diagnoses failed and cancelled jobs from their stored metrics rows.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

# Thresholds, each a judgement call documented by its finding's evidence.
DIVERGING_RISE = 1.5  # final train loss above first by this factor
UNSTABLE_JUMP = 2.0  # an epoch's train loss above the previous one by this factor
# An epoch's mean train loss this many times the loss of guessing (ln C): the output layer
# starts small, so the loss begins near ln C; steps too large throw it far above.
ABOVE_CHANCE = 3.0
NO_PROGRESS_SHARE = 0.9  # of the loss of guessing (ln C) still left after training
OVERFIT_GAP = 0.15  # train accuracy minus val accuracy
OVERFIT_VAL_RISE = 1.2  # final val loss above the best by this factor
VANISHING_RATIO = 1e-3  # earliest trained stage's gradient norm relative to the head's
EXPLODING_GROWTH = 10.0
IMBALANCE = 3.0
POOR_RECALL_SHARE = 0.5  # a class's recall below this share of the mean recall


@dataclass
class Finding:
    code: str
    message: str
    evidence: str
    action: str


def _finite(values: list) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


@dataclass(frozen=True)
class Chance:
    """The training loss of guessing, and how to say it."""

    loss: float
    words: str


def single_label_chance(num_classes: int) -> Chance | None:
    """Cross-entropy of a uniform guess: ln C."""
    if num_classes < 2:
        return None
    return Chance(math.log(num_classes), f"guessing among {num_classes} classes")


def multi_label_chance(positives: dict[str, int], images: int) -> Chance | None:
    """Binary cross-entropy of guessing each label at its frequency: the mean, over the
    classes, of the entropy of its share of positives (at most ln 2)."""
    shares = [n / images for n in positives.values()] if images else []
    entropies = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) for p in shares if 0 < p < 1]
    if not entropies:
        return None
    return Chance(sum(entropies) / len(entropies), "guessing each label at its frequency")


def _diverging(history: list[dict], error: str | None, chance: Chance | None) -> Finding | None:
    if error and ("loss became" in error or "non-finite" in error):
        return Finding("diverging", "The loss diverged to infinity or NaN.", error,
                       "Lower optimizer.lr (or use lr auto), or set grad_clip_norm.")
    losses = [row.get("train_loss") for row in history]
    finite = _finite(losses)
    if len(finite) < len(losses):
        return Finding("diverging", "The training loss became infinite or NaN.",
                       f"train_loss per epoch: {losses}", "Lower optimizer.lr, or set "
                       "grad_clip_norm.")
    if len(finite) >= 2 and finite[-1] > DIVERGING_RISE * finite[0]:
        return Finding("diverging", "The training loss rose instead of falling.",
                       f"train_loss went from {finite[0]:.3g} to {finite[-1]:.3g}",
                       "Lower optimizer.lr (a tenth), or use lr auto.")
    if chance and finite and max(finite) > ABOVE_CHANCE * chance.loss:
        return Finding("diverging", "The training loss went far above the loss of guessing.",
                       f"train_loss reached {max(finite):.3g}, {max(finite) / chance.loss:.1f}x "
                       f"the {chance.loss:.3g} of {chance.words}",
                       "Lower optimizer.lr (a tenth), or use lr auto.")
    # Within a stage only: a new stage (more layers, augmentation) starts from a higher loss.
    jumps = [(b["epoch"], b["train_loss"] / a["train_loss"])
             for a, b in itertools.pairwise(history) if a.get("stage") == b.get("stage")
             and (a.get("train_loss") or 0) > 0 and b["train_loss"] > UNSTABLE_JUMP
             * a["train_loss"]]
    if jumps:
        epoch, ratio = jumps[0]
        return Finding("unstable", "The training loss jumped up during training.",
                       f"epoch {epoch}'s train_loss was {ratio:.1f}x the epoch before",
                       "Lower optimizer.lr, add warmup (schedule.warmup_epochs), or set "
                       "grad_clip_norm.")
    return None


def _no_progress(history: list[dict], chance: Chance | None) -> Finding | None:
    losses = _finite([row.get("train_loss") for row in history])
    if not losses or chance is None:
        return None
    accuracy = history[-1].get("train_accuracy")
    if losses[-1] < NO_PROGRESS_SHARE * chance.loss:
        return None
    acc = f", train accuracy {accuracy:.2f}" if isinstance(accuracy, float) else ""
    return Finding("no_progress", "The model learned almost nothing.",
                   f"final train_loss {losses[-1]:.3g} vs {chance.loss:.3g} for "
                   f"{chance.words}{acc}",
                   "Raise optimizer.lr (or use lr auto), train more epochs, or unfreeze more "
                   "stages (freeze.strategy auto or last_n_blocks).")


def _overfitting(history: list[dict]) -> Finding | None:
    rows = [r for r in history if r.get("val_loss") is not None]
    if len(rows) < 2:
        return None
    last = rows[-1]
    gap = (last.get("train_accuracy") or 0.0) - (last.get("val_accuracy") or 0.0)
    best = min(r["val_loss"] for r in rows)
    rising = last["val_loss"] > OVERFIT_VAL_RISE * best and last["train_loss"] < rows[0][
        "train_loss"]
    if gap < OVERFIT_GAP or not rising:
        return None
    return Finding("overfitting", "The model memorises the training images.",
                   f"train accuracy {last['train_accuracy']:.2f} vs val {last['val_accuracy']:.2f};"
                   f" val_loss rose from its best {best:.3g} to {last['val_loss']:.3g}",
                   "Add regularisation (head.dropout, optimizer.weight_decay) or augmentation "
                   "(augment light/strong), unfreeze fewer stages, or add images.")


def _gradients(history: list[dict]) -> list[Finding]:
    findings = []
    norms = _finite([row.get("grad_norm") for row in history])
    # Relative growth only: a head on raw pooled features has norms in the tens when healthy.
    if norms and norms[0] > 0 and max(norms) > EXPLODING_GROWTH * norms[0]:
        findings.append(Finding(
            "exploding_gradients", "Gradient norms grew very large.",
            f"gradient norm per epoch went from {norms[0]:.3g} to a peak of {max(norms):.3g}",
            "Set grad_clip_norm (1.0 is a common choice) and lower optimizer.lr."))
    for row in history:
        stages = {k: v for k, v in (row.get("stage_grad_norms") or {}).items()
                  if k.startswith("stage") and isinstance(v, (int, float))}
        head = (row.get("stage_grad_norms") or {}).get("head")
        if not stages or not head:
            continue
        earliest = min(stages, key=lambda name: int(name.removeprefix("stage")))
        if stages[earliest] < VANISHING_RATIO * head:
            findings.append(Finding(
                "vanishing_gradients", "The earliest trained stage gets almost no gradient.",
                f"epoch {row.get('epoch')}: {earliest} gradient norm {stages[earliest]:.2g} vs "
                f"head {head:.2g}",
                "Unfreeze fewer stages (its updates are wasted), or raise its rate "
                "(optimizer.layer_decay closer to 1)."))
            break
    return findings


def _early_stop_at_first(history: list[dict], stopped_early: bool,
                         best_epoch: int | None) -> Finding | None:
    if not stopped_early or best_epoch != 1 or len(history) < 2:
        return None
    return Finding("early_stop_epoch_1", "The best epoch was the first; later ones only got "
                   "worse.", f"best epoch 1 of {len(history)} run",
                   "Lower optimizer.lr, or raise early_stopping.patience.")


def _finetune_no_gain(history: list[dict], best_epoch: int | None) -> Finding | None:
    """Fine-tuning ran, and the best epoch is still one of the head trained alone."""
    tuned = [row for row in history if row.get("stage") == "finetune"]
    if not tuned or best_epoch is None or not 0 < best_epoch <= len(history):
        return None
    best = history[best_epoch - 1]
    losses = _finite([row.get("val_loss") for row in tuned])
    if best.get("stage") == "finetune" or not losses or "val_loss" not in best:
        return None
    seconds = sum(_finite([row.get("seconds") for row in tuned]))
    return Finding("finetune_no_gain", "Fine-tuning did not beat the head trained alone: the "
                   "model is the head stage's.",
                   f"best val loss {best['val_loss']:.4g} at epoch {best_epoch} "
                   f"({best.get('stage')}); fine-tuning's best {min(losses):.4g} in "
                   f"{len(tuned)} epoch(s), {seconds:.0f} s",
                   "Preset fast trains the same head in a fraction of the time on data like "
                   "this; more labelled images usually let fine-tuning pay.")


def _imbalance(evaluation: dict | None, class_counts: dict[str, int] | None,
               class_weights: str | None) -> Finding | None:
    counts = [n for n in (class_counts or {}).values() if n > 0]
    per_class = ((evaluation or {}).get("val") or {}).get("per_class") or []
    if not counts or max(counts) < IMBALANCE * min(counts) or not per_class:
        return None
    recalls = {row["class"]: row.get("recall") for row in per_class
               if isinstance(row.get("recall"), (int, float))}
    if not recalls:
        return None
    mean = sum(recalls.values()) / len(recalls)
    poor = sorted(c for c, r in recalls.items() if r < POOR_RECALL_SHARE * mean)
    if not poor:
        return None
    action = ("Add images of these classes." if class_weights == "balanced" else
              "Set class_weights balanced (or auto), or add images of these classes.")
    return Finding("imbalance_hurts_recall", "Rare classes are often missed.",
                   f"largest class {max(counts)} images, smallest {min(counts)}; val recall "
                   f"of {', '.join(poor)}: " + ", ".join(f"{recalls[c]:.2f}" for c in poor)
                   + f" (mean {mean:.2f})", action)


def _unlabeled_unused(advice: dict | None, uses_unlabeled: bool) -> Finding | None:
    """Few labelled images and many unlabelled ones the spec does not use."""
    if advice is None or uses_unlabeled:
        return None
    return Finding("unlabeled_unused", "Few labelled images, and unlabelled ones left unused.",
                   advice["why"], "Try spec.pseudo_labels (rounds 2) with the unlabelled "
                   "images; label more images where you can, which helps most.")


def diagnose(history: list[dict], *, num_classes: int, evaluation: dict | None = None,
             class_counts: dict[str, int] | None = None, class_weights: str | None = None,
             stopped_early: bool = False, best_epoch: int | None = None,
             error: str | None = None, unlabeled_advice: dict | None = None,
             uses_unlabeled: bool = False, chance: Chance | None = None) -> list[dict]:
    """Findings as dicts (code, message, evidence, action); a healthy run has none.
    ``unlabeled_advice``: the recipe's advice on unlabelled images (resolved "unlabeled").
    ``chance``: the loss of guessing (default: a single-label run's, ln of the classes)."""
    chance = chance or single_label_chance(num_classes)
    diverging = _diverging(history, error, chance)
    found = [diverging, None if diverging else _no_progress(history, chance),
             _overfitting(history), *_gradients(history),
             _early_stop_at_first(history, stopped_early, best_epoch),
             _finetune_no_gain(history, best_epoch),
             _imbalance(evaluation, class_counts, class_weights),
             _unlabeled_unused(unlabeled_advice, uses_unlabeled)]
    return [asdict(f) for f in found if f is not None]
