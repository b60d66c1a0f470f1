"""The ranks of a data-parallel run, as the training code sees them, and the few collectives
it needs. Outside a process group every helper is the identity, so one-device code paths do
not change.

How the work is divided (docs/architecture.md, "Data-parallel jobs"):
- Image batches are sharded: the global batch is the spec's ``batch_size`` in the order one
  process would use, and rank r trains on its images ``r::world``. The loss of each shard is
  weighted by its share of the global batch and gradients are summed, so a step applies the
  gradient of the whole batch, whatever the device count.
- Gradients are summed with one flat all-reduce per step after backward, rather than by
  wrapping the module in DistributedDataParallel: the module that trains changes within a run
  (the head on cached features, the stages above a frozen prefix, the whole network) and so
  does its trainable set as stages unfreeze, which DDP's reducer fixes at construction.
- BatchNorm layers that train normalise with the whole global batch's statistics
  (synced.py), as one process would; or, with ``sync_batchnorm`` false (CPU ranks by
  default), with their shard's, the running statistics averaged over the ranks at the end of
  every epoch (timm's ``--dist-bn reduce``).
- Rank 0's weights are broadcast at the start of every epoch, so ranks cannot drift.
- Decisions that depend on time (epochs in the budget, stopping when it is spent) or that
  must be taken once (early stopping, the learning rate) are rank 0's, broadcast to all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def writes(self) -> bool:
        """Only rank 0 writes checkpoints, reports progress and builds the model."""
        return self.rank == 0


SINGLE = Ranks()


def current() -> Ranks:
    """This process's place in the run's process group (one rank of one outside a group)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return SINGLE


def _comm_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(value: T) -> T:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not current().distributed:
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def summed(values: Sequence[float]) -> list[float]:
    """Each value summed over the ranks, in float64 (exact for counts)."""
    if not current().distributed:
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.cpu()]


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``tensor`` (on the CPU), in rank order: for metrics that rank
    all the images at once (mean average precision), which sums cannot give."""
    if not current().distributed:
        return tensor.cpu()
    parts: list[Any] = [None] * current().world
    dist.all_gather_object(parts, tensor.cpu())
    return torch.cat(parts)


def _flat(tensors: list[torch.Tensor], collective: Callable[[torch.Tensor], object]) -> None:
    """Run ``collective`` in place over ``tensors``: one call per dtype, not per tensor."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        collective(flat)
        offset = 0
        for tensor in group:
            tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def _flat_all_reduce(tensors: list[torch.Tensor]) -> None:
    """Sum tensors over the ranks, in place."""
    _flat(tensors, dist.all_reduce)


def sum_gradients(params: Iterable[nn.Parameter]) -> None:
    """Sum the ranks' gradients (each rank's loss is already weighted by its share)."""
    if not current().distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        _flat_all_reduce(grads)


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (in place: optimizers keep theirs)."""
    if not current().distributed:
        return
    tensors = [t for t in (*module.parameters(), *module.buffers())
               if t.is_floating_point() or t.dtype == torch.long]
    _flat(tensors, lambda flat: dist.broadcast(flat, src=0))


@dataclass(frozen=True)
class Shards:
    """This rank's part of an epoch's global batches (global batch i is
    ``order[i*B:(i+1)*B]``, and rank r takes its images ``r::world``)."""

    order: torch.Tensor  # this rank's images, batch after batch
    sizes: list[int]  # of this rank's part of each batch
    global_sizes: list[int]  # of each whole batch


@torch.no_grad()
def average_batchnorm(module: nn.Module) -> None:
    """Average the running statistics of BatchNorm layers that trained on each rank's
    shards only (``sync_batchnorm`` false), as timm's ``--dist-bn reduce`` does."""
    ranks = current()
    if not ranks.distributed:
        return
    stats = [buffer for layer in module.modules()
             if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training
             for buffer in (layer.running_mean, layer.running_var) if buffer is not None]
    if stats:
        _flat_all_reduce(stats)
        for buffer in stats:
            buffer.div_(ranks.world)


def shard_batches(order: torch.Tensor, batch_size: int) -> Shards:
    ranks = current()
    parts = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    mine = [part[ranks.rank::ranks.world] for part in parts]
    return Shards(torch.cat(mine) if mine else order[:0], [len(p) for p in mine],
                  [len(p) for p in parts])


def positions(global_size: int) -> torch.Tensor:
    """Where this rank's images sit in a global batch of ``global_size``."""
    ranks = current()
    return torch.arange(global_size)[ranks.rank::ranks.world]


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's share of ``indices`` for a pass that is summed afterwards (evaluation)."""
    ranks = current()
    return indices[ranks.rank::ranks.world] if ranks.distributed else indices


class ShareDone(Exception):
    """Raised on a rank other than 0 once the epochs are trained: its part is done."""


def leave() -> Ranks:
    """End this rank's part in the group (after the epochs): rank 0 goes on alone to
    evaluate and build the model. Returns the ranks as they were."""
    ranks = current()
    if ranks.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return ranks
