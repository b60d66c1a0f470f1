"""How much memory a run will need, estimated before anything is built (no torch import).

A rough, deliberately generous model from the backbone's measured sizes (backbones/sizes.py):
weights, gradients and optimizer state of what trains, activations kept for the backward pass
(which grow with batch size and pixel count), frozen features when they are cached, decoded
images held in memory, and a fixed allowance for the runtime. It is used to refuse, with the
numbers, a spec that cannot fit a worker's device, instead of dying halfway through.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ftune.models.backbones.catalog import PACKAGED_BACKBONES
from ftune.models.backbones.sizes import BACKBONE_SIZES
from ftune.models.recipe import rules
from ftune.models.spec import FineTuneSpec
from ftune.models.tuning.optimizers import optimizer_info

FLOAT = 4  # bytes: training keeps float32 master weights
RUNTIME_BYTES = 600 * 2**20  # torch, CUDA context or CPU allocator, Python
DEFAULT_SIZE = 224


@dataclass(frozen=True)
class MemoryEstimate:
    total_bytes: int
    parts: dict[str, int]

    def describe(self) -> str:
        gb = {k: f"{v / 2**30:.2f}" for k, v in self.parts.items() if v >= 2**20}
        return (f"about {self.total_bytes / 2**30:.1f} GB ("
                + ", ".join(f"{k} {v} GB" for k, v in gb.items()) + ")")


def architecture_sizes(backbone: str) -> tuple[int, int, int, int] | None:
    """(parameters, feature width, activation elements per 224 px image: all, largest), or
    None when the backbone was not measured."""
    entry = PACKAGED_BACKBONES.get(backbone)
    return BACKBONE_SIZES.get(entry.architecture if entry else backbone)


def estimate(spec: FineTuneSpec, *, num_classes: int, num_images: int,
             image_size: int | None = None, decode_cache_bytes: int = 0) -> MemoryEstimate | None:
    """Peak memory of training ``spec``; None for a backbone of unknown size."""
    sizes = architecture_sizes(spec.backbone)
    if sizes is None:
        return None
    params, features, act_224, largest_224 = sizes
    side = image_size or (spec.image_size if isinstance(spec.image_size, int) else DEFAULT_SIZE)
    pixels = (side / DEFAULT_SIZE) ** 2
    # The head alone (head_only, or auto with preset fast) trains on cached features unless
    # augmentation is asked for; auto augmentation is none then.
    trains_backbone = not spec.head_alone or spec.augment not in ("none", "auto")
    trainable = 0 if spec.head_alone else params
    head = _head_params(spec, features, num_classes)
    states = 1 + optimizer_states(spec.optimizer.name)  # the gradient, then the moments
    parts = {
        "weights": (params + head) * FLOAT,
        "gradients and optimizer state": (trainable + head) * states * FLOAT,
        # Training keeps every activation for the backward pass, and their gradients; frozen
        # features are computed without autograd, holding a few layers' outputs at a time.
        "activations": int(spec.batch_size * pixels * FLOAT
                           * (2 * act_224 if trains_backbone else 3 * largest_224)),
        "cached features": 0 if trains_backbone else num_images * features * FLOAT,
        "decoded images": min(decode_cache_bytes, num_images * 3 * side * side),
        "runtime": RUNTIME_BYTES,
    }
    return MemoryEstimate(sum(parts.values()), parts)


def optimizer_states(name: str) -> int:
    """Tensors the optimizer keeps per parameter; ``auto`` is what the recipe would choose.
    An unknown name raises ValueError: a guess would make the estimate quietly wrong."""
    if name == "auto":
        name = rules.optimizer_name().value
    return optimizer_info(name).state_tensors


def _head_params(spec: FineTuneSpec, features: int, num_classes: int) -> int:
    widths = [features, *spec.head.hidden, num_classes]
    return sum(a * b + b for a, b in itertools.pairwise(widths))
