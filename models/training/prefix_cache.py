"""What the frozen bottom stages of a backbone make of each image of a split, computed once
per training stage and then reused every epoch, while the stages above them train
(``models/tuning/frozen_prefix.py`` says when a backbone can be split so)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from ftune.models.data.source import BatchSizes, index_batches
from ftune.models.settings import engine_settings
from ftune.models.training.loop import stop_if_asked
from ftune.models.training.runtime import Precision, as_channels_last, device_memory_bytes
from ftune.models.tuning.frozen_prefix import FrozenSplit

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]

# Of the device's memory, at most this share holds the frozen stages' outputs; the rest is
# the model's and the batches'.
PREFIX_CACHE_SHARE = 0.1


def prefix_cache_budget(device: torch.device) -> int:
    """Bytes the frozen stages' outputs may take: within the decoded-image budget and a
    tenth of the device's memory."""
    capacity = device_memory_bytes(device)
    budget = engine_settings().decode_cache_bytes
    return budget if capacity is None else min(budget, int(PREFIX_CACHE_SHARE * capacity))


class PrefixCache:
    """The frozen stages' outputs per split, kept on the device within ``budget_bytes``."""

    def __init__(self, split: FrozenSplit, precision: Precision, budget_bytes: int) -> None:
        self.split, self.precision, self.budget_bytes = split, precision, budget_bytes
        self._outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.too_large = False  # set once a split's outputs would not fit beside the rest
        self.seconds = 0.0  # spent computing outputs

    @torch.no_grad()
    def outputs(self, name: str, size: int, batches: Callable[[], Batches],
                should_stop: Callable[[], bool] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The outputs and labels of split ``name`` (``size`` images, in ``batches`` order,
        centre-cropped, not augmented); None when they would not fit the budget."""
        if name in self._outputs or self.too_large:
            return self._outputs.get(name)
        started = time.perf_counter()
        chunks: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        for images, targets in batches():
            stop_if_asked(should_stop)
            with self.precision.autocast():
                out = self.split.prefix(images)
            if not chunks and self.bytes() + out[0].numel() * out.element_size() * size > \
                    self.budget_bytes:
                self.too_large = True
                return None
            chunks.append(out)
            labels.append(targets)
        self._outputs[name] = (torch.cat(chunks), torch.cat(labels))
        self.seconds += time.perf_counter() - started
        return self._outputs[name]

    def bytes(self) -> int:
        """What the outputs kept so far take."""
        return sum(out.numel() * out.element_size() for out, _ in self._outputs.values())

    def batches(self, name: str, order: torch.Tensor, batch_size: BatchSizes) -> Batches:
        """``order``'s rows of split ``name`` (computed already), ``batch_size`` at a time."""
        outputs, labels = self._outputs[name]
        for idx in index_batches(order.to(outputs.device), batch_size):
            yield as_channels_last(outputs[idx]), labels[idx]
