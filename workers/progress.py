"""Engine callbacks that write a running job's progress to the DB, and the thread that keeps
its heartbeat fresh. A cancel request or a lost claim reaches the engine through
``should_stop``."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from ftune.service.db.session import Database
from ftune.service.lifecycle import transitions

log = logging.getLogger(__name__)


@dataclass
class ProgressReporter:
    """Engine callbacks that write progress to the DB and poll it for a cancel request."""

    db: Database
    job_id: str
    worker: str
    poll_s: float
    shutdown: threading.Event
    event_s: float = 2.0
    deadline: float | None = None  # time.monotonic() after which the run is over its limit
    _last_write: float = 0.0
    _last_event: float = 0.0
    _cancelled: bool = False
    over_time: bool = False
    lost: bool = False  # another worker owns the job now (we were paused and taken over)
    trial: bool = False  # the job is a sweep's trial: its pruner is asked after each epoch
    pruned: bool = False  # the pruner said stop

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

    def on_stage(self, stage: str, epochs: int) -> None:
        with self.db.session() as session:
            if not transitions.record_stage(session, self.job_id, self.worker, stage, epochs):
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
        if now - self._last_write < self.poll_s and step < steps:
            return
        self._last_write = now
        event = now - self._last_event >= self.event_s or step == steps
        if event:
            self._last_event = now
        with self.db.session() as session:
            state = transitions.record_progress(session, self.job_id, self.worker, epoch, step,
                                              steps, loss, event=event)
        self._cancelled = state == "cancel"
        self.lost = self.lost or state == "lost"

    def should_stop(self) -> bool:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.over_time = True
            return True
        if self.shutdown.is_set() or self._cancelled or self.lost or self.pruned:
            return True
        if time.monotonic() - self._last_write >= self.poll_s:
            # No batch finished for a while (a slow first batch): look for a cancel directly.
            self._last_write = time.monotonic()
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
