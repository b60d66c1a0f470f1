"""ONNX, TorchScript and Triton exports, and the serving preparation (ONNX Runtime's files,
its parity check and int8), built in a child process so predictions keep flowing.

Tracing or exporting a model takes seconds to minutes of CPU and a few times the model's
memory. Done in the API process it would hold the torch thread that serves every prediction
(and the GIL for much of that time); in a child (``ftune export``, the same command users run)
it costs a core and nothing else. A slot limit (``FTUNE_EXPORTS_AT_ONCE``) bounds how many
children one API process starts; a request beyond it gets 503 with ``Retry-After`` instead of a
thread waiting in the pool, and a child over ``FTUNE_EXPORT_TIMEOUT_S`` is killed.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ftune.service.errors import Unavailable

log = logging.getLogger(__name__)

RETRY_AFTER_S = 30  # an export of a small model takes about this long on one core
_STDERR_TAIL = 2000
_CHILD_THREADS = "2"  # torch's intra-op threads in the child: leave the API its cores


class ExportSlots:
    """At most ``size`` exports at once in this process; the rest are told to come back."""

    def __init__(self, size: int, busy: str = "another ONNX, TorchScript or Triton export "
                 "is being built") -> None:
        self._free = threading.BoundedSemaphore(size)
        self.busy = busy  # what a refusal says the slots are doing

    @contextmanager
    def slot(self, wait_s: float | None = None) -> Iterator[None]:
        """A slot now, or (``wait_s``) within that long; else 503 with ``Retry-After``."""
        if not self._free.acquire(blocking=wait_s is not None, timeout=wait_s):
            raise Unavailable(f"every export slot is busy ({self.busy}); try again shortly",
                              retry_after_s=RETRY_AFTER_S)
        try:
            yield
        finally:
            self._free.release()

    def run(self, source: Path, target: Path, fmt: str, *, timeout_s: float,
            name: str = "model") -> Path:
        with self.slot():
            return export_in_child(source, target, fmt, timeout_s=timeout_s, name=name)


def export_in_child(source: Path, target: Path, fmt: str, *, timeout_s: float,
                    name: str = "model") -> Path:
    """Run ``ftune export`` on ``source``; it writes ``target`` atomically. ``name``: the
    model's, for a Triton repository."""
    try:
        run_engine_child(["export", str(source), "--format", fmt, "--out", str(target),
                          "--name", name], f"the {fmt} export", timeout_s=timeout_s)
    finally:
        for partial in target.parent.glob(f".{target.name}.*"):  # a killed child's temp file
            partial.unlink(missing_ok=True)
    if not target.is_file():
        raise RuntimeError(f"the {fmt} export wrote nothing; see the API log")
    return target


# Children running now: killed when the API exits, so none outlives it (a background serving
# preparation would otherwise keep a core busy after a restart).
_running: set[subprocess.Popen] = set()
_running_lock = threading.Lock()


@atexit.register
def _kill_running() -> None:
    with _running_lock:
        for child in _running:
            child.kill()


def run_engine_child(args: list[str], what: str, *, timeout_s: float) -> None:
    """``python -m ftune.models.cli ARGS`` on the CPU with two threads, killed past
    ``timeout_s`` (503 naming FTUNE_EXPORT_TIMEOUT_S); a failure names ``what``."""
    command = [sys.executable, "-m", "ftune.models.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": _CHILD_THREADS, "MKL_NUM_THREADS": _CHILD_THREADS,
           "FTUNE_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    child = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with _running_lock:
        _running.add(child)
    try:
        _, stderr = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        log.warning("%s took over %.0f s; killed (%s)", what, timeout_s, args[1])
        raise Unavailable(f"building {what} took longer than FTUNE_EXPORT_TIMEOUT_S "
                          f"({timeout_s:.0f} s); ask an operator to raise it") from None
    finally:
        with _running_lock:
            _running.discard(child)
    if child.returncode != 0:
        tail = stderr[-_STDERR_TAIL:].decode("utf-8", "replace")
        log.error("%s of %s failed (exit %s): %s", what, args[1], child.returncode, tail)
        raise RuntimeError(f"{what} failed (exit {child.returncode}); see the API log")
