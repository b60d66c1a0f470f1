"""ONNX and TorchScript exports, built in a child process so predictions keep flowing.

Tracing or exporting a model takes seconds to minutes of CPU and a few times the model's
memory. Done in the API process it would hold the torch thread that serves every prediction
(and the GIL for much of that time); in a child (``ftune export``, the same command users run)
it costs a core and nothing else. A slot limit (``FTUNE_EXPORTS_AT_ONCE``) bounds how many
children one API process starts; a request beyond it gets 503 with ``Retry-After`` instead of a
thread waiting in the pool, and a child over ``FTUNE_EXPORT_TIMEOUT_S`` is killed.
"""

from __future__ import annotations

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

    def __init__(self, size: int) -> None:
        self._free = threading.BoundedSemaphore(size)

    @contextmanager
    def slot(self) -> Iterator[None]:
        if not self._free.acquire(blocking=False):
            raise Unavailable("every export slot is busy (another ONNX or TorchScript export is "
                              "being built); try again shortly", retry_after_s=RETRY_AFTER_S)
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
    command = [sys.executable, "-m", "ftune.models.cli", "export", str(source),
               "--format", fmt, "--out", str(target), "--name", name]
    env = {**os.environ, "OMP_NUM_THREADS": _CHILD_THREADS, "MKL_NUM_THREADS": _CHILD_THREADS,
           "FTUNE_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    try:
        done = subprocess.run(command, env=env, capture_output=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        for partial in target.parent.glob(f".{target.name}.*"):  # the killed child's temp file
            partial.unlink(missing_ok=True)
        log.warning("export of %s as %s took over %.0f s; killed", source.name, fmt, timeout_s)
        raise Unavailable(f"building the {fmt} export took longer than FTUNE_EXPORT_TIMEOUT_S "
                          f"({timeout_s:.0f} s); ask an operator to raise it") from None
    if done.returncode != 0 or not target.is_file():
        tail = done.stderr[-_STDERR_TAIL:].decode("utf-8", "replace")
        log.error("export of %s as %s failed (exit %s): %s", source, fmt, done.returncode, tail)
        raise RuntimeError(f"the {fmt} export failed (exit {done.returncode}); see the API log")
    return target
