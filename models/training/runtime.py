"""Device placement and mixed precision, chosen automatically."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TypeVar

import torch

from ftune.models.recipe import rules
from ftune.models.settings import engine_settings

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def resolve_device(requested: str | None = None) -> torch.device:
    """CUDA when present, else CPU; ``requested`` or ``FTUNE_DEVICE`` override."""
    name = requested or engine_settings().device
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype | None  # None: plain float32

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype == torch.float16 and self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


# Convolutions run faster with channels last, on CPUs (oneDNN) as on GPUs. bench/layout.py on
# 2 CPU cores, 96 px, one machine: training every stage 1.5-1.7x faster for the packaged
# backbones (1.1x resnet18), the top 2 stages 1.3-1.6x, inference 1.2-1.3x; on another, AVX2
# only, lite0 1.29x, 1.03x, 1.05x.
def channels_last(model: ModuleT) -> ModuleT:
    """The model with its 4-D weights stored channels last."""
    return model.to(memory_format=torch.channels_last)


def as_channels_last(batch: torch.Tensor) -> torch.Tensor:
    """An image batch (N, C, H, W) laid out like the model's weights; other shapes as given."""
    return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch


PRECISIONS: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}


def resolve_precision(mode: str, device: torch.device) -> Precision:
    """The spec's ``mixed_precision``; ``auto`` as ``rules.mixed_precision`` decides."""
    if mode == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        mode = rules.mixed_precision(device.type, bf16).value
    return Precision(device, PRECISIONS[mode])


def configure_backends(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def device_memory_bytes(device: torch.device) -> int | None:
    """Memory a run may use on ``device``: a GPU's total, or the CPU's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def feature_batch_size(device: torch.device) -> int:
    """Images per forward pass when only features are computed (no gradients). On CPUs small
    batches stay in cache: lite0 at 96 px costs 3.2 ms an image at 16, 4.0 at 32 and 6.1 at
    128 (measured on this project's 2-core machines); GPUs want large ones."""
    return 128 if device.type == "cuda" else 16
