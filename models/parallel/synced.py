"""A training step on a rank's shard that computes what one process computes on the whole
global batch: BatchNorm statistics and dropout masks.

A BatchNorm layer in train mode normalises with its batch's statistics; on shards each rank
would use its shard's, and a run would mean something else on 2 devices than on 1. While
``synced_step`` is active, every BatchNorm that trains (``nn.BatchNorm`` layers and timm's
``BatchNormAct2d`` alike: both call ``F.batch_norm``) uses the sum and sum of squares of all
ranks' shards, reduced with one differentiable all-reduce, so forward, backward and running
statistics are those of the whole batch. torch's ``SyncBatchNorm`` does the same on GPUs
only (its kernels are CUDA's), and swapping modules would drop timm's fused activation; this
works on gloo and NCCL alike.

Dropout draws its mask for the whole batch from the generator every rank shares (all ranks
seed alike and draw alike) and each rank keeps its rows: the ranks stay in step, and on the
CPU the masks are those one process draws.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed.nn.functional as dist_fn
from torch.nn import functional

from ftune.models.parallel.ranks import current, positions


def _batch_norm(original: Callable[..., torch.Tensor], input: torch.Tensor,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                training: bool = False, momentum: float = 0.1,
                eps: float = 1e-5) -> torch.Tensor:
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


def _dropout(original: Callable[..., torch.Tensor], global_size: int, input: torch.Tensor,
             p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    if not training or p == 0.0 or p == 1.0:
        return original(input, p, training, inplace)
    # As torch's CPU dropout: a Bernoulli mask, scaled, the shape of the (whole) batch.
    noise = torch.empty((global_size, *input.shape[1:]), dtype=input.dtype,
                        device=input.device).bernoulli_(1 - p)
    noise = noise[positions(global_size).to(input.device)].div_(1 - p)
    return input.mul_(noise) if inplace else input * noise


@contextlib.contextmanager
def synced_step(global_size: int, *, batchnorm: bool = True) -> Iterator[None]:
    """A step on this rank's shard of a global batch of ``global_size`` images (a no-op
    outside a process group); ``batchnorm``: also BatchNorm over the whole batch. Only ever
    entered by a rank, whose process trains nothing else: the functions it replaces
    meanwhile are process-wide."""
    if not current().distributed:
        yield
        return
    batch_norm, dropout = functional.batch_norm, functional.dropout

    def synced_batch_norm(*args: Any, **kwargs: Any) -> torch.Tensor:
        return _batch_norm(batch_norm, *args, **kwargs)

    def synced_dropout(*args: Any, **kwargs: Any) -> torch.Tensor:
        return _dropout(dropout, global_size, *args, **kwargs)

    functional.dropout = synced_dropout
    if batchnorm:
        functional.batch_norm = synced_batch_norm
    try:
        yield
    finally:
        functional.batch_norm, functional.dropout = batch_norm, dropout
