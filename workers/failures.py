"""Turn an exception from a run into a message a user can act on (never a bare traceback)."""

from __future__ import annotations

import errno
import gc

import torch
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from ftune.models.errors import (
    DatasetError,
    FineTuneError,
    RankGroupLost,
    UnknownBackboneError,
    WeightsMismatchError,
    WeightsNotFoundError,
)
from ftune.models.spec import SpecError
from ftune.service.blobs.base import is_store_outage

_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.EBUSY, errno.ESTALE,
                     errno.ECONNRESET, errno.ECONNREFUSED, errno.EINTR}


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


def is_transient(exc: BaseException) -> bool:
    """Infrastructure hiccups worth retrying; everything else fails at once."""
    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if is_store_outage(exc):  # the blob store down or overloaded
        return True
    if isinstance(exc, RankGroupLost):  # resumes from its checkpoint, on any device count
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def halved_batch_spec(spec: dict) -> dict | None:
    """The spec with half the batch size, when it allows an out-of-memory retry; else None."""
    if not spec.get("oom_retry", True) or spec["batch_size"] <= 1:
        return None
    # Once: the smaller run does not retry again.
    return {**spec, "batch_size": spec["batch_size"] // 2, "oom_retry": False}


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_users_to_fix(exc: BaseException) -> bool:
    """A failure the job's owner can fix (data, spec, weights, size), not a bug of ours."""
    return isinstance(exc, (FineTuneError, SpecError)) or is_out_of_memory(exc)


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError) or "CUDA out of memory" in str(exc):
        return ("out of GPU memory: lower batch_size or image_size, or freeze more layers "
                "(freeze.strategy head_only or last_n_blocks)")
    if is_out_of_memory(exc):  # MemoryError, or torch's CPU allocator giving up
        return ("out of memory on the worker: lower batch_size or image_size, or set "
                "FTUNE_DECODE_CACHE_MB lower so images stream from disk")
    if isinstance(exc, UnknownBackboneError):
        return f"unknown backbone: {exc}"
    if isinstance(exc, (WeightsNotFoundError, WeightsMismatchError)):
        return f"pretrained weights problem: {exc}"
    if isinstance(exc, DatasetError):
        return f"dataset problem: {exc}"
    if isinstance(exc, (FineTuneError, SpecError)):  # their messages say what to change
        return str(exc)
    if isinstance(exc, OSError):
        return f"storage error on the worker: {exc.strerror or exc}; try the job again"
    return (f"internal error ({type(exc).__name__}: {exc}); the worker log has the details; "
            "please report it")
