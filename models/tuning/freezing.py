"""Which backbone stages train at a given epoch, and putting frozen parts in eval mode."""

from __future__ import annotations

from torch import nn

from ftune.models.network import FineTuneModel
from ftune.models.spec import FreezeSpec


def trainable_stage_count(freeze: FreezeSpec, epoch: int, num_stages: int) -> int:
    """How many of the last backbone stages train during ``epoch`` (0-based)."""
    if freeze.strategy == "head_only":
        return 0
    if freeze.strategy == "none":
        return num_stages
    if freeze.strategy == "last_n_blocks":
        return min(freeze.n_blocks, num_stages)
    # gradual: head only for the first `unfreeze_every` epochs, then one stage more each time.
    return min(num_stages, epoch // freeze.unfreeze_every)


def apply_freezing(model: FineTuneModel, stages: list[list[str]], n_trainable: int) -> None:
    """Only the head and the last ``n_trainable`` stages require gradients."""
    trainable = {name for stage in stages[len(stages) - n_trainable:] for name in stage}
    for name, param in model.backbone.named_parameters():
        param.requires_grad_(name in trainable)
    for param in model.head.parameters():
        param.requires_grad_(True)


def set_train_mode(model: FineTuneModel, n_trainable: int, batchnorm: str) -> None:
    """``model.train()``, except that with ``batchnorm="frozen"`` frozen parts stay in eval mode
    so their BatchNorm running statistics are untouched."""
    model.train()
    if batchnorm != "frozen":
        return
    if n_trainable == 0:
        model.backbone.eval()  # nothing there trains: deterministic features (cacheable)
        return
    for module in model.backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def backbone_is_frozen(n_trainable: int, batchnorm: str) -> bool:
    """True when the backbone computes the same features for an image every epoch."""
    return n_trainable == 0 and batchnorm == "frozen"
