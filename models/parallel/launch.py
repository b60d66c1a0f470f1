"""Run ``fit`` on several devices of this machine: one process per device, started by
PyTorch's own launcher (``torch.distributed.run``, torchrun) with a private rendezvous on a
free loopback port, NCCL on CUDA and gloo on CPU.

The caller's process is not itself a rank: a Celery worker's job thread cannot become one,
and one process that watches the group can stop it whole. ``fit_on_devices`` starts the
ranks as a process group of their own, relays rank 0's callbacks (channel.py), checks the
caller's ``should_stop`` while it waits, and returns rank 0's result. A cancel ends every
rank at once (the group is killed: a checkpoint is only ever stored whole, between epochs).
A rank that dies ends the group (torchrun stops the others) and raises ``RankGroupLost``;
the run then resumes from its checkpoint, on any device count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ftune.models.derived.store import DerivedStore
from ftune.models.errors import RankGroupLost, TrainingCancelled
from ftune.models.parallel import channel
from ftune.models.settings import engine_settings
from ftune.models.spec import FineTuneSpec
from ftune.models.training.run_setup import Callbacks

if TYPE_CHECKING:
    from ftune.models.training.fit import FitResult

log = logging.getLogger(__name__)

POLL_S = 0.2  # between looks at the ranks, the channel and should_stop
STOP_GRACE_S = 5.0  # a stopped group's ranks get this long after SIGTERM, then SIGKILL
LOG_TAIL = 2000  # characters of the ranks' output quoted when the group dies


@dataclass(frozen=True)
class Devices:
    count: int
    kind: str  # "cuda" (the first ``count`` visible GPUs) or "cpu" (ranks on the CPU)


def rank_threads(devices: Devices) -> int:
    """Threads per rank: CPU ranks split this process's threads (more would only fight for
    the same cores); a GPU's rank keeps a share for its input pipeline."""
    return max(1, torch.get_num_threads() // devices.count)


def fit_on_devices(devices: Devices, data: str | Path, spec: FineTuneSpec, *, folder: Path,
                   checkpoint_dir: Path, resume: Path | None = None,
                   callbacks: Callbacks | None = None, cache_features: bool = True,
                   resolved: dict | None = None, time_limit_s: float | None = None,
                   derived: DerivedStore | None = None, owner: str | None = None) -> FitResult:
    """``fit`` across ``devices`` (see the module's docstring); ``folder`` holds the group's
    launch file, output and result, and is the caller's to remove."""
    callbacks = callbacks or Callbacks()
    folder.mkdir(parents=True, exist_ok=True)
    listener, endpoint = channel.listen()
    launch = folder / "launch.json"
    fd = os.open(launch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the key
    with os.fdopen(fd, "w") as out:
        json.dump({
            "folder": str(folder), "endpoint": endpoint.to_dict(), "device_kind": devices.kind,
            "engine": engine_settings().model_dump(mode="json"), "data": str(data),
            "spec": spec.model_dump(mode="json"), "checkpoint_dir": str(checkpoint_dir),
            "resume": None if resume is None else str(resume),
            "cache_features": cache_features, "resolved": resolved or {},
            "time_limit_s": time_limit_s, "owner": owner,
            "derived": None if derived is None else {"root": str(derived.root),
                                                     "max_bytes": derived.max_bytes},
        }, out)
    group = RankGroup.start(devices, launch, folder)
    try:
        return group.wait(listener, callbacks)
    finally:
        group.stop()
        listener.close()


class RankGroup:
    """torchrun and its ranks: one process group (a session of their own), stopped whole."""

    def __init__(self, process: subprocess.Popen, folder: Path, output: Path) -> None:
        self.process, self.folder, self.output = process, folder, output

    @classmethod
    def start(cls, devices: Devices, launch: Path, folder: Path) -> RankGroup:
        env = dict(os.environ, OMP_NUM_THREADS=str(rank_threads(devices)))
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
            f"--nproc-per-node={devices.count}", "--rdzv-backend=c10d",
            "--rdzv-endpoint=127.0.0.1:0", f"--rdzv-id={uuid.uuid4().hex}",
            "--local-addr=127.0.0.1", "--max-restarts=0", "--monitor-interval=0.5",
            "-m", "ftune.models.parallel.rank_main", str(launch)]
        output = folder / "ranks.log"
        with open(output, "wb") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        log.info("started %d %s ranks (torchrun pid %d)", devices.count, devices.kind,
                 process.pid)
        return cls(process, folder, output)

    def wait(self, listener: Listener, callbacks: Callbacks) -> FitResult:
        accepted: queue.Queue[Connection] = queue.Queue()

        def accept() -> None:
            with contextlib.suppress(OSError):
                accepted.put(listener.accept())

        threading.Thread(target=accept, name="ftune-ranks-accept", daemon=True).start()
        line = _Line(accepted, callbacks)
        result: str | None = None
        while result is None:
            if callbacks.should_stop is not None and callbacks.should_stop():
                self.stop()
                raise TrainingCancelled("training cancelled")
            result = line.relay(POLL_S)
            if result is None and self.process.poll() is not None:
                result = line.drain()  # rank 0's last messages (its result, say) still count
                if result is None:
                    raise self._failure()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=60)  # the other ranks have left already
        return torch.load(result, weights_only=False)

    def _failure(self) -> BaseException:
        """Why the group ended without a result: a rank's own error (the lowest rank's
        that is not just the loss of another rank), else ``RankGroupLost``."""
        errors: list[BaseException] = []
        for path in sorted(self.folder.glob("error-rank*.pickle"),
                           key=lambda p: int(p.stem.removeprefix("error-rank"))):
            with contextlib.suppress(Exception):
                errors.append(pickle.loads(path.read_bytes()))
        own = [e for e in errors if not _lost_peer(e)]
        if own:
            return own[0]
        tail = self.output.read_text(errors="replace")[-LOG_TAIL:] if self.output.exists() \
            else ""
        log.warning("the ranks ended without a result (exit %s); their output ends:\n%s",
                    self.process.returncode, tail)
        return RankGroupLost(f"a rank of the data-parallel run died (torchrun exit "
                             f"{self.process.returncode}); resuming from the last checkpoint")

    def stop(self) -> None:
        """End every process of the group: SIGTERM, then SIGKILL for any still there."""
        pgid = self.process.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=STOP_GRACE_S)
        with contextlib.suppress(ProcessLookupError):  # ranks outliving torchrun included
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=STOP_GRACE_S)


# How gloo and NCCL say that another rank has gone (as RuntimeError in torch 2.14).
PEER_LOST = ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer")


def _lost_peer(exc: BaseException) -> bool:
    """Whether a rank failed only because another one died."""
    return isinstance(exc, dist.DistError) or any(sign in str(exc) for sign in PEER_LOST)


class _Line:
    """The launcher's end of the channel: rank 0 connects once, and hangs up at its end."""

    def __init__(self, accepted: queue.Queue[Connection], callbacks: Callbacks) -> None:
        self.accepted, self.callbacks = accepted, callbacks
        self.conn: Connection | None = None
        self.closed = False

    def relay(self, wait_s: float) -> str | None:
        """Handle one message if one comes within ``wait_s``; the result's path once sent."""
        if self.closed:
            time.sleep(wait_s)
            return None
        if self.conn is None:
            with contextlib.suppress(queue.Empty):
                self.conn = self.accepted.get(timeout=wait_s)
            return None
        try:
            if not self.conn.poll(wait_s):
                return None
            kind, payload = self.conn.recv()
        except (EOFError, OSError):  # rank 0 has gone: the group's exit says why
            self.closed = True
            return None
        return _handle(kind, payload, self.conn, self.callbacks)

    def drain(self) -> str | None:
        """The messages still buffered once the ranks have ended."""
        while not self.closed and self.conn is not None:
            result = self.relay(0)
            if result is not None:
                return result
            if not self.closed and not self.conn.poll(0):
                break
        return None


def _handle(kind: str, payload: Any, conn: Connection, callbacks: Callbacks) -> str | None:
    if kind == channel.BATCH and callbacks.on_batch_end is not None:
        callbacks.on_batch_end(*payload)
    elif kind == channel.STAGE and callbacks.on_stage is not None:
        callbacks.on_stage(*payload)
    elif kind == channel.RESOLVED and callbacks.on_resolved is not None:
        callbacks.on_resolved(payload)
    elif kind == channel.LOG:
        level, name, message = payload
        logging.getLogger(name).log(level, "%s", message)
    elif kind == channel.EPOCH:
        if callbacks.on_epoch_end is not None:
            callbacks.on_epoch_end(payload)
        conn.send(channel.ACK)
    elif kind == channel.DONE:
        return str(payload)
    return None
