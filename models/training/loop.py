"""One epoch of training and one pass of evaluation, as plain functions.

Both take any module and an iterable of ``(inputs, targets)`` already on the device: the full
network on image batches, or just the head on cached backbone features.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ftune.models.errors import NonFiniteLossError, TrainingCancelled
from ftune.models.parallel.ranks import gathered, sum_gradients, summed
from ftune.models.parallel.synced import synced_step
from ftune.models.tasks import Task, mean_average_precision, task_of
from ftune.models.training.runtime import Precision

BatchHook = Callable[[int, int, float], None]  # (step in epoch, steps in epoch, loss)


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    steps: int
    grad_norm: float | None = None  # mean over steps of the overall gradient norm
    stage_grad_norms: dict[str, float] = field(default_factory=dict)


@dataclass
class ValStats:
    loss: float
    accuracy: float  # multi-label: each label of each image at 0.5
    map: float | None = None  # multi-label: mean average precision over the classes


def stop_if_asked(should_stop: Callable[[], bool] | None) -> None:
    """Raise TrainingCancelled when the caller asks to stop (checked at batch boundaries)."""
    if should_stop is not None and should_stop():
        raise TrainingCancelled("training cancelled")


def _norm(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class _EpochTotals:
    """Running sums for an epoch's metrics; kept on the device (no sync per step)."""

    def __init__(self) -> None:
        self.loss = torch.zeros((), dtype=torch.float64)
        self.correct: torch.Tensor | int = 0
        self.seen = self.steps = self.decisions = 0
        self.stage_norms: dict[str, torch.Tensor] = {}
        self.overall_norm: torch.Tensor | float = 0.0

    def add_grad_norms(self, grad_groups: dict[str, list[nn.Parameter]]) -> None:
        """Gradient norm of each group (head, stages) and of all of them, this step."""
        step_norms = []
        for name, params in grad_groups.items():
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                norm = _norm(grads).detach()
                self.stage_norms[name] = self.stage_norms.get(name, 0) + norm
                step_norms.append(norm)
        if step_norms:
            self.overall_norm = self.overall_norm + torch.linalg.vector_norm(
                torch.stack(step_norms))

    def add_batch(self, logits: torch.Tensor, targets: torch.Tensor, loss: float) -> None:
        batch = targets.shape[0]
        self.loss += loss * batch
        hits, decisions = task_of(targets).hits(logits, targets)
        self.correct += hits
        self.seen += batch
        self.decisions += decisions
        self.steps += 1

    def add_ranks(self) -> None:
        """Sum the ranks' counts: the epoch's loss and accuracy over the whole batch."""
        self.loss, self.correct, self.seen, self.decisions = summed(  # type: ignore[assignment]
            [float(self.loss), int(self.correct), self.seen, self.decisions])
        self.seen, self.decisions = int(self.seen), int(self.decisions)

    def stats(self) -> EpochStats:
        return EpochStats(
            loss=float(self.loss) / max(self.seen, 1),
            accuracy=int(self.correct) / max(self.decisions, 1),
            steps=self.steps,
            grad_norm=float(self.overall_norm) / self.steps if self.stage_norms else None,
            stage_grad_norms={name: float(total) / self.steps
                              for name, total in self.stage_norms.items()},
        )


def _checked_loss(loss: torch.Tensor, step: int, optimizer: torch.optim.Optimizer) -> float:
    return _finite(loss.item(), step, optimizer)


def _finite(value: float, step: int, optimizer: torch.optim.Optimizer) -> float:
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"loss became {value} at step {step} of the epoch; lower optimizer.lr "
            f"(the head's lr is now {optimizer.param_groups[0]['lr']:.3g}), set "
            f"grad_clip_norm, or check the data"
        )
    return value


def _shard_loss(loss: torch.Tensor, targets: torch.Tensor, loss_fn: nn.Module, step: int,
                optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, float, float]:
    """A rank's loss on its shard of the global batch, weighted by its share of the batch's
    weight (images, or class weights), so that summing the ranks' gradients gives the
    gradient of the whole batch's mean loss. Also returns the whole batch's loss and this
    shard's; every rank raises together when any shard's loss is not finite."""
    local = loss.item()
    class_weights = getattr(loss_fn, "weight", None)
    weight = (float(class_weights[targets].sum()) if class_weights is not None
              else float(targets.shape[0]))
    finite = math.isfinite(local)
    total_weight, weighted, bad = summed([weight, local * weight if finite else 0.0,
                                          0.0 if finite else 1.0])
    whole = weighted / total_weight if not bad else float("nan")
    _finite(whole, step, optimizer)
    return loss * (weight / total_weight), whole, local


def train_one_epoch(
    module: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: nn.Module,
    precision: Precision,
    scaler: torch.amp.GradScaler,
    first_step: int,
    lr_at_step: Callable[[int], float],
    grad_groups: dict[str, list[nn.Parameter]],
    grad_clip_norm: float | None = None,
    steps_in_epoch: int = 0,
    on_batch: BatchHook | None = None,
    should_stop: Callable[[], bool] | None = None,
    global_sizes: list[int] | None = None,
    sync_batchnorm: bool = True,
) -> EpochStats:
    """``global_sizes``: the batches are this rank's shards of global batches of these
    sizes; gradients and the epoch's totals are summed over the ranks, and BatchNorm and
    dropout work on the whole batch (BatchNorm only with ``sync_batchnorm``;
    models/parallel)."""
    totals = _EpochTotals()
    sharded = global_sizes is not None
    all_params = [p for params in grad_groups.values() for p in params]
    for inputs, targets in batches:
        stop_if_asked(should_stop)
        factor = lr_at_step(first_step + totals.steps)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        step = (synced_step(global_sizes[totals.steps], batchnorm=sync_batchnorm)
                if global_sizes is not None else nullcontext())
        with precision.autocast(), step:
            logits = module(inputs)
            loss = loss_fn(logits.float(), targets)
        if sharded:
            loss, loss_value, local_value = _shard_loss(loss, targets, loss_fn,
                                                        totals.steps + 1, optimizer)
        else:
            loss_value = local_value = _checked_loss(loss, totals.steps + 1, optimizer)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if sharded:  # still scaled: every rank's scaler then sees the same gradients
            sum_gradients(all_params)
        scaler.unscale_(optimizer)
        totals.add_grad_norms(grad_groups)
        if grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(all_params, grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        totals.add_batch(logits, targets, local_value)
        if on_batch is not None:
            on_batch(totals.steps, steps_in_epoch, loss_value)
    if sharded:
        totals.add_ranks()
    return totals.stats()


@torch.no_grad()
def evaluate(
    module: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    loss_fn: nn.Module,
    precision: Precision,
    sharded: bool = False,
    task: Task | None = None,
) -> ValStats:
    """Mean loss and accuracy (and multi-label, mean average precision); the caller decides
    the module's train/eval mode (``sharded``: the batches are this rank's share, and the
    metrics are over every rank's). ``task``: known beforehand, so a rank without images
    still joins the others in gathering scores; else read from the targets."""
    total_loss = 0.0
    correct = seen = decisions = 0
    scores: list[torch.Tensor] = []
    truths: list[torch.Tensor] = []
    for inputs, targets in batches:
        with precision.autocast():
            logits = module(inputs).float()
        task = task_of(targets)
        total_loss += float(loss_fn(logits, targets)) * targets.shape[0]
        hits, count = task.hits(logits, targets)
        correct, seen, decisions = correct + int(hits), seen + targets.shape[0], decisions + count
        if targets.dim() == 2:  # ranking metrics need every image's scores at once
            scores.append(logits.cpu())
            truths.append(targets.cpu())
    if sharded:
        total_loss, correct, seen, decisions = summed(  # type: ignore[assignment]
            [total_loss, correct, seen, decisions])
    stats = ValStats(total_loss / max(seen, 1), correct / max(decisions, 1))
    if scores or (task is not None and task.metric == "val_map"):
        logits_all = torch.cat(scores) if scores else torch.empty(0)
        truth_all = torch.cat(truths) if truths else torch.empty(0)
        if sharded:
            logits_all, truth_all = gathered(logits_all), gathered(truth_all)
        stats.map = mean_average_precision(logits_all, truth_all)
    return stats
