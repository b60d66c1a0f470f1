"""Optimizer parameter groups: no L2 on biases and norm weights, discriminative learning rates.

Units join the optimizer in a fixed order, the head first and then backbone stages from the top
down, so the same epoch always yields the same group layout (needed to resume optimizer state).
"""

from __future__ import annotations

from ftune.models.auto_fields import decided
from ftune.models.network import FineTuneModel
from ftune.models.spec import OptimizerSpec

HEAD = -1  # unit id of the head; backbone stages are 0..S-1 from input to output


def join_order(num_stages: int, n_trainable: int) -> list[int]:
    """Units that train with ``n_trainable`` stages unfrozen, in the order they joined."""
    return [HEAD] + [num_stages - 1 - k for k in range(n_trainable)]


def lr_scale(unit: int, num_stages: int, layer_decay: float | None) -> float:
    """The head keeps the base lr; stage i gets ``layer_decay ** (S - i)``."""
    if unit == HEAD or layer_decay is None:
        return 1.0
    return layer_decay ** (num_stages - unit)


def unit_param_groups(
    model: FineTuneModel, stages: list[list[str]], unit: int, spec: OptimizerSpec
) -> list[dict]:
    """One or two groups for a unit: parameters with L2, and biases/norm weights without."""
    if unit == HEAD:
        named = [(f"head.{n}", p) for n, p in model.head.named_parameters()]
    else:
        wanted = set(stages[unit])
        named = [(f"backbone.{n}", p) for n, p in model.backbone.named_parameters()
                 if n in wanted]
    decay = [p for _, p in named if p.ndim > 1]
    no_decay = [p for _, p in named if p.ndim <= 1]
    lr = decided(spec.lr) * lr_scale(unit, len(stages), decided(spec.layer_decay))
    name = "head" if unit == HEAD else f"stage{unit}"
    groups = []
    for params, weight_decay, suffix in ((decay, spec.weight_decay, ""),
                                         (no_decay, 0.0, ".no_decay")):
        if params:
            groups.append({"params": params, "lr": lr, "base_lr": lr,
                           "weight_decay": weight_decay, "name": name + suffix})
    return groups
