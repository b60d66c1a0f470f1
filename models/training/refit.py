"""Refit: once early stopping has chosen how many epochs the head needs, train it again from
its first weights on the training and validation features together, for that many epochs.

A val split carved from the training images costs a fifth of the data. When the head alone
trains on cached features, training it again is nearly free, so the model the user gets has
learned from every labelled image (as scikit-learn's ``refit`` does after a search). Val
metrics stay those of the model before the refit: after it, val is no longer held out.
"""

from __future__ import annotations

import torch

from ftune.models.network import init_head
from ftune.models.training.loop import train_one_epoch
from ftune.models.training.run import TrainingRun, epoch_order, samples_per_epoch
from ftune.models.tuning.optimizers import create_optimizer
from ftune.models.tuning.param_groups import HEAD, unit_param_groups
from ftune.models.tuning.schedules import lr_multiplier


def refit_head(run: TrainingRun, epochs: int) -> int:
    """Train ``run``'s head again, from the seed's initial weights, on train+val cached
    features for ``epochs`` epochs. Returns how many images it learned from."""
    train_x, train_y = run.cached_features("train")
    val_x, val_y = run.cached_features("val")
    features, labels = torch.cat([train_x, val_x]), torch.cat([train_y, val_y])
    spec, head = run.spec, run.model.head
    torch.manual_seed(spec.seed)
    init_head(head, spec.head)
    optimizer = create_optimizer(unit_param_groups(run.model, run.stages, HEAD, spec.optimizer),
                                 spec.optimizer)
    n = samples_per_epoch(len(labels), spec.batch_size)
    steps_per_epoch = -(-n // spec.batch_size)
    total_steps = steps_per_epoch * epochs
    head.train()
    step = 0
    for epoch in range(epochs):
        order = epoch_order(spec.seed, epoch, len(labels), n).to(features.device)
        batches = ((features[idx], labels[idx]) for idx in order.split(spec.batch_size))
        stats = train_one_epoch(
            head, batches, optimizer, loss_fn=run.loss_fn, precision=run.precision,
            scaler=run.scaler, first_step=step,
            lr_at_step=lambda s: lr_multiplier(spec.schedule.name, s, total_steps, 0),
            grad_groups={"head": list(head.parameters())}, grad_clip_norm=spec.grad_clip_norm,
            steps_in_epoch=steps_per_epoch, should_stop=run.should_stop)
        step += stats.steps
    head.eval()
    return n
