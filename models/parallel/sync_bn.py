"""BatchNorm over the whole global batch while ranks train on its shards.

A BatchNorm layer in train mode normalises with its batch's statistics; on shards of the
batch each rank would use its shard's, and a run would mean something else on 2 devices than
on 1. While ``synced_batchnorm`` is active, every BatchNorm that trains (plain ``nn.BatchNorm``
layers and timm's ``BatchNormAct2d`` alike, which both call ``F.batch_norm``) uses the sum and
sum of squares of all ranks' shards, reduced with one differentiable all-reduce, so forward,
backward and running statistics are those of one process on the whole batch. torch's
``SyncBatchNorm`` does the same on GPUs only (its kernels are CUDA's), and replacing modules
would lose timm's fused activation; this works on gloo and NCCL alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed.nn.functional as dist_fn
from torch.nn import functional

from ftune.models.parallel.ranks import current


def _synced(original: Callable[..., torch.Tensor], input: torch.Tensor,
            running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
            weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
            training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    if not training:  # eval mode normalises with the running statistics: nothing to share
        return original(input, running_mean, running_var, weight, bias, training, momentum,
                        eps)
    channels = input.shape[1]
    dims = [0, *range(2, input.dim())]
    values = input.float()
    local = torch.cat([values.sum(dims), (values * values).sum(dims),
                       values.new_full((1,), input.numel() // channels)])
    total = dist_fn.all_reduce(local)  # its backward sums the ranks' gradients too
    count = total[-1]
    mean = total[:channels] / count
    var = (total[channels:2 * channels] / count - mean * mean).clamp(min=0)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            unbiased = var.detach() * count / (count - 1).clamp(min=1)
            running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
    shape = [1, channels] + [1] * (input.dim() - 2)
    out = (values - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out.to(input.dtype)


@contextlib.contextmanager
def synced_batchnorm() -> Iterator[None]:
    """BatchNorm layers in train mode use the global batch's statistics meanwhile (a no-op
    outside a process group). Only ever entered by a rank, whose process trains nothing
    else."""
    if not current().distributed:
        yield
        return
    original = functional.batch_norm

    def batch_norm(*args: Any, **kwargs: Any) -> torch.Tensor:
        return _synced(original, *args, **kwargs)

    functional.batch_norm = batch_norm
    try:
        yield
    finally:
        functional.batch_norm = original
