"""How the worker classifies a run's failures: retry, halve the batch, or fail at once."""

from __future__ import annotations


def test_out_of_memory_retry_halves_the_batch_once():
    from ftune.workers.failures import halved_batch_spec, is_out_of_memory

    spec = {"batch_size": 32, "oom_retry": True}
    smaller = halved_batch_spec(spec)
    assert smaller == {"batch_size": 16, "oom_retry": False}
    assert halved_batch_spec(smaller) is None  # only once
    assert halved_batch_spec({"batch_size": 32, "oom_retry": False}) is None
    assert halved_batch_spec({"batch_size": 1}) is None
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_transient_errors_are_told_apart_from_deterministic_ones():
    import errno

    from sqlalchemy.exc import OperationalError

    from ftune.models.errors import DatasetError, WeightsNotFoundError
    from ftune.workers.failures import is_transient

    assert is_transient(OperationalError("UPDATE jobs", {}, Exception("database is locked")))
    assert is_transient(OSError(errno.EIO, "I/O error"))
    assert not is_transient(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_transient(DatasetError("class folder(s) with no usable images"))
    assert not is_transient(WeightsNotFoundError("no pretrained weights"))
