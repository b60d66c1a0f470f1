"""The frozen bottom of a backbone as a module of its own, so that its output can be computed
once per image and reused every epoch while only the top stages train.

With the lower stages frozen, their BatchNorm statistics fixed and the training images not
augmented, what those stages make of an image never changes; each training step then runs the
top stages alone (``bench/train_throughput.py``, ``top_stages``: lite0's top 3 of 8 stages at
96 px train an epoch 1.6x as fast on 2 CPU cores).

Only a backbone whose forward is a plain chain of its stages can be split so: timm's
EfficientNet family, which every packaged backbone is. Any other always runs whole.
"""

from __future__ import annotations

from typing import NamedTuple, cast

import torch
from timm.layers import DropPath
from timm.models.efficientnet import EfficientNet
from torch import nn

from ftune.models.network import FineTuneModel


class FrozenSplit(NamedTuple):
    prefix: nn.Module  # images -> the frozen stages' output
    suffix: nn.Module  # that output -> logits: the trainable stages and the head


class _Suffix(nn.Module):
    """The backbone from block ``first`` on, then the head: timm's own forward, resumed."""

    def __init__(self, model: FineTuneModel, first: int) -> None:
        super().__init__()
        self.model, self.first = model, first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backbone = cast(EfficientNet, self.model.backbone)  # split_frozen split only these
        for block in backbone.blocks[self.first:]:
            x = block(x)
        return self.model.head(backbone.forward_head(backbone.bn2(backbone.conv_head(x))))


def _stochastic(module: nn.Module) -> bool:
    return any((isinstance(m, nn.Dropout) and m.p > 0) or
               (isinstance(m, DropPath) and m.drop_prob > 0) for m in module.modules())


def split_frozen(model: FineTuneModel, stages: list[list[str]],
                 n_trainable: int) -> FrozenSplit | None:
    """The frozen stages (all but the last ``n_trainable`` of ``stages``) and the rest, or None
    when the backbone cannot be split there: not a chain of stages, nothing frozen or nothing
    training, or random layers (dropout) among the frozen ones."""
    backbone = model.backbone
    frozen_blocks = len(stages) - n_trainable - 1  # stage 0 is the stem, then one per block
    if not isinstance(backbone, EfficientNet) or backbone.grad_checkpointing or \
            n_trainable < 1 or frozen_blocks < 0 or frozen_blocks >= len(backbone.blocks):
        return None
    prefix = nn.Sequential(backbone.conv_stem, backbone.bn1, *backbone.blocks[:frozen_blocks])
    names = {n for n, _ in backbone.named_parameters()
             if n.startswith(("conv_stem.", "bn1.")) or
             (n.startswith("blocks.") and int(n.split(".")[1]) < frozen_blocks)}
    frozen = {n for stage in stages[:len(stages) - n_trainable] for n in stage}
    if names != frozen or _stochastic(prefix):
        return None
    return FrozenSplit(prefix, _Suffix(model, frozen_blocks))
