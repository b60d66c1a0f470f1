"""The network being tuned: a pretrained backbone with a new classification head."""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from ftune.models.recipe.rules import HEAD_DROPOUT
from ftune.models.spec import HeadSpec

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
}


def build_head(in_features: int, num_classes: int, spec: HeadSpec) -> nn.Sequential:
    """[Dropout → Linear → (BatchNorm1d) → activation]* → Dropout → Linear."""
    layers: list[nn.Module] = []
    width = in_features
    dropout = HEAD_DROPOUT if spec.dropout == "auto" else spec.dropout  # unresolved: the usual
    for hidden in spec.hidden:
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width, hidden, bias=not spec.batchnorm))
        if spec.batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(_ACTIVATIONS[spec.activation]())
        width = hidden
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, num_classes))
    head = nn.Sequential(*layers)
    init_head(head, spec)
    return head


# The classifier's weights start this small, so its first logits are near zero and the first
# loss is about ln(C), the loss of guessing, rather than twice that.
OUTPUT_INIT_STD = 0.01


def init_head(head: nn.Module, spec: HeadSpec) -> None:
    """He (Kaiming) or Glorot (Xavier) weights for hidden layers, small ones for the output
    layer, and zero biases."""
    gain_name: Literal["leaky_relu", "relu"] = (
        "leaky_relu" if spec.activation == "leaky_relu" else "relu")
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    for module in linears:
        if module is linears[-1]:
            nn.init.normal_(module.weight, std=OUTPUT_INIT_STD)
        elif spec.init == "he":
            nn.init.kaiming_normal_(module.weight, nonlinearity=gain_name)
        else:
            nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class FineTuneModel(nn.Module):
    """``head(backbone(x))``; kept separable so frozen features can be cached."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def reinit_head(head: nn.Module, spec: HeadSpec, seed: int) -> None:
    """New weights for a head, initialised as ``build_head`` does, from ``seed`` (drawn on the
    CPU: the same weights on any device) and without touching the global random state."""
    fresh = copy.deepcopy(head).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in fresh.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_parameters()
        init_head(fresh, spec)
    head.load_state_dict(fresh.state_dict())
