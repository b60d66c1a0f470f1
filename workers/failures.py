"""Turn an exception from a run into a message a user can act on (never a bare traceback)."""

from __future__ import annotations

import torch

from models.errors import (
    DatasetError,
    FineTuneError,
    NonFiniteLossError,
    UnknownBackboneError,
    WeightsMismatchError,
    WeightsNotFoundError,
)
from models.spec import SpecError


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError) or (
            isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()):
        return ("out of GPU memory: lower batch_size or image_size, or freeze more layers "
                "(freeze.strategy head_only or last_n_blocks)")
    if isinstance(exc, MemoryError):
        return ("out of memory on the worker: lower batch_size or image_size, or set "
                "FTUNE_DECODE_CACHE_MB lower so images stream from disk")
    if isinstance(exc, UnknownBackboneError):
        return f"unknown backbone: {exc}"
    if isinstance(exc, (WeightsNotFoundError, WeightsMismatchError)):
        return f"pretrained weights problem: {exc}"
    if isinstance(exc, DatasetError):
        return f"dataset problem: {exc}"
    if isinstance(exc, NonFiniteLossError):
        return str(exc)
    if isinstance(exc, SpecError):
        return str(exc)
    if isinstance(exc, FineTuneError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"storage error on the worker: {exc.strerror or exc}; try the job again"
    return (f"internal error ({type(exc).__name__}: {exc}); the worker log has the details; "
            "please report it")
