"""Engine callbacks that write a running job's progress to the DB, and the thread that keeps
its heartbeat fresh. A cancel request or a lost claim reaches the engine through
``should_stop``."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftune.service.db.session import Database
from ftune.service.lifecycle import transitions

if TYPE_CHECKING:
    from ftune.models.training.fit import Callbacks

log = logging.getLogger(__name__)

# Progress events are throttled harder than progress writes: a stream needs fewer of them
# than the job view, and each is a row kept for the job's life.
PROGRESS_EVENT_S = 2.0


@dataclass
class ProgressReporter:
    """Engine callbacks that write progress to the DB and poll it for a cancel request;
    ``callbacks()`` hands them to the engine."""

    db: Database
    job_id: str
    worker: str
    progress_s: float  # between batch-progress writes (FTUNE_PROGRESS_INTERVAL_S)
    cancel_poll_s: float  # between looks for a cancel request (FTUNE_CANCEL_POLL_S)
    shutdown: threading.Event
    event_s: float = PROGRESS_EVENT_S
    deadline: float | None = None  # time.monotonic() after which the run is over its limit
    # time.monotonic() of the last of each; never, at first, so the first batch writes both.
    _last_write: float = -math.inf
    _last_cancel_check: float = -math.inf
    _last_event: float = -math.inf
    _cancelled: bool = False
    over_time: bool = False
    lost: bool = False  # another worker owns the job now (we were paused and taken over)
    trial: bool = False  # the job is a sweep's trial: its pruner is asked after each epoch
    pruned: bool = False  # the pruner said stop

    def callbacks(self) -> Callbacks:
        """All of this reporter's hooks, as the engine takes them."""
        # Imported here: the engine's training modules load torch, which the worker loads
        # once at start-up (workers/main.py), not whoever imports this module.
        from ftune.models.training.fit import Callbacks

        return Callbacks(on_epoch_end=self.on_epoch_end, on_batch_end=self.on_batch_end,
                         should_stop=self.should_stop, on_stage=self.on_stage,
                         on_resolved=self.on_resolved,
                         on_pretrain_epoch=self.on_pretrain_epoch)

    def on_epoch_end(self, row: dict) -> None:
        with self.db.session() as session:
            if not transitions.record_epoch(session, self.job_id, self.worker, row):
                self.lost = True
        if self.trial and not self.lost:
            self._ask_pruner(int(row["epoch"]))

    def _ask_pruner(self, epoch: int) -> None:
        from ftune.service.sweeps.pruning import prune_verdict

        try:
            with self.db.session() as session:
                self.pruned = prune_verdict(session, self.job_id)
        except Exception as exc:  # no verdict is not a reason to stop training
            log.warning("job %s: the sweep's pruner could not be asked: %s", self.job_id, exc)
        if self.pruned:
            log.info("job %s pruned by its sweep's pruner after epoch %d", self.job_id, epoch)

    def on_stage(self, stage: str, epochs: int, stage_epochs: int) -> None:
        with self.db.session() as session:
            if not transitions.record_stage(session, self.job_id, self.worker, stage, epochs,
                                            stage_epochs):
                self.lost = True

    def on_pretrain_epoch(self, row: dict) -> None:
        with self.db.session() as session:
            if not transitions.record_pretrain_epoch(session, self.job_id, self.worker, row):
                self.lost = True

    def on_resolved(self, resolved: dict) -> None:
        with self.db.session() as session:
            if not transitions.record_resolved(session, self.job_id, self.worker, resolved):
                self.lost = True

    def on_batch_end(self, epoch: int, step: int, steps: int, loss: float) -> None:
        now = time.monotonic()
        if now - self._last_write < self.progress_s and step < steps:
            return  # the epoch's last step is always written: the job view ends on it
        self._last_write = now
        event = now - self._last_event >= self.event_s or step == steps
        if event:
            self._last_event = now
        with self.db.session() as session:
            state = transitions.record_progress(session, self.job_id, self.worker, epoch, step,
                                                steps, loss, event=event)
        # The write read the cancel flag too, so it counts as a look for a cancel.
        self._last_cancel_check = now
        self._cancelled = state == "cancel"
        self.lost = self.lost or state == "lost"

    def should_stop(self) -> bool:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.over_time = True
            return True
        if self.shutdown.is_set() or self._cancelled or self.lost or self.pruned:
            return True
        if time.monotonic() - self._last_cancel_check >= self.cancel_poll_s:
            # No progress write has looked for a while (a slow first batch, or writes spaced
            # further apart than cancel polls): look for a cancel directly.
            self._last_cancel_check = time.monotonic()
            with self.db.session() as session:
                self._cancelled = transitions.cancel_requested(session, self.job_id)
        return self._cancelled


class JobHeartbeat:
    """Keeps the job's heartbeat fresh while it runs, including long stretches without batch
    callbacks (feature caching, evaluation), so it is never mistaken for abandoned."""

    def __init__(self, db: Database, reporter: ProgressReporter, interval_s: float) -> None:
        self.db, self.reporter, self.interval_s = db, reporter, interval_s
        job_id = reporter.job_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"job-{job_id[:8]}", daemon=True)

    def __enter__(self) -> JobHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with self.db.session() as session:
                    if not transitions.beat(session, self.reporter.job_id, self.reporter.worker):
                        self.reporter.lost = True  # training stops at the next batch
            except Exception as exc:  # a missed beat is not fatal; the next one may succeed
                log.warning("job %s heartbeat failed: %s", self.reporter.job_id, exc)
