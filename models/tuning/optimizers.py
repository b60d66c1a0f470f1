"""Optimizer factory for the seven names the spec allows."""

from __future__ import annotations

import torch

from ftune.models.spec import OptimizerSpec


def create_optimizer(groups: list[dict], spec: OptimizerSpec) -> torch.optim.Optimizer:
    # Weight decay is set per group (zero for biases/norms), so it is not passed here.
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr)
    if spec.name == "momentum":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum)
    if spec.name == "nesterov":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=True)
    if spec.name == "adagrad":
        return torch.optim.Adagrad(groups, lr=spec.lr)
    if spec.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=spec.lr, momentum=spec.momentum)
    if spec.name == "adam":
        return torch.optim.Adam(groups, lr=spec.lr)  # weight_decay here is L2 in the gradient
    if spec.name == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr)  # decoupled weight decay
    raise ValueError(f"unknown optimizer {spec.name!r}")
