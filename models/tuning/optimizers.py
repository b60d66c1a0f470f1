"""The optimizers a spec may name: one table, read by the factory, the memory estimate and the
spec's list of names.

To add an optimizer, add its name to ``OptimizerName`` and a row to ``OPTIMIZERS``
(tests/models/test_tuning.py fails when the two differ). The table names torch classes by
their attribute name, so this module imports no torch until ``create_optimizer`` runs: the
spec (validated by the API without torch) and the memory estimate read it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    import torch

OptimizerName = Literal["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"]


@dataclass(frozen=True)
class OptimizerInfo:
    """How to build one optimizer, and what it keeps per parameter."""

    torch_class: str  # an attribute of torch.optim
    state_tensors: int  # kept per parameter besides its gradient (for the memory estimate)
    uses_momentum: bool = False  # passed the spec's ``momentum``
    options: Mapping[str, object] = field(default_factory=dict)  # fixed keyword arguments


# Weight decay is set per parameter group (zero for biases and norms), never here.
OPTIMIZERS: dict[str, OptimizerInfo] = {
    "sgd": OptimizerInfo("SGD", state_tensors=0),
    "momentum": OptimizerInfo("SGD", state_tensors=1, uses_momentum=True),
    "nesterov": OptimizerInfo("SGD", state_tensors=1, uses_momentum=True,
                              options={"nesterov": True}),
    "adagrad": OptimizerInfo("Adagrad", state_tensors=1),  # the sum of squared gradients
    "rmsprop": OptimizerInfo("RMSprop", state_tensors=2, uses_momentum=True),
    "adam": OptimizerInfo("Adam", state_tensors=2),  # a group's weight_decay: L2 in the gradient
    "adamw": OptimizerInfo("AdamW", state_tensors=2),  # decoupled weight decay
}


class OptimizerChoice(Protocol):
    """What the factory reads of a spec's ``optimizer`` (``ftune.models.spec.OptimizerSpec``,
    which imports this module for its names, so it is not named here)."""

    @property
    def name(self) -> str: ...
    @property
    def lr(self) -> float | str: ...
    @property
    def momentum(self) -> float: ...


def optimizer_info(name: str) -> OptimizerInfo:
    """The table's row for ``name``; an unknown name is an error, never a guess."""
    info = OPTIMIZERS.get(name)
    if info is None:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    return info


def create_optimizer(groups: list[dict], spec: OptimizerChoice) -> torch.optim.Optimizer:
    """The spec's optimizer over ``groups`` (each with its own lr and weight decay)."""
    import torch

    info = optimizer_info(spec.name)
    momentum = {"momentum": spec.momentum} if info.uses_momentum else {}
    optimizer_class = getattr(torch.optim, info.torch_class)
    optimizer: torch.optim.Optimizer = optimizer_class(groups, lr=spec.lr, **momentum,
                                                       **info.options)
    return optimizer
