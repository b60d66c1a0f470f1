"""Run one fine-tuning job: the engine in, the database and storage out. No Celery here."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.exc import IntegrityError

from ftune.models.data.discover import scan_image_folder
from ftune.models.data.trees import remove_tree
from ftune.models.derived.store import DerivedStore
from ftune.models.errors import ResourceError, TrainingCancelled
from ftune.models.recipe import rules
from ftune.models.recipe.resolve import STATIC_FIELDS
from ftune.models.recipe.rules import Choice
from ftune.models.spec import FineTuneSpec, parse_spec
from ftune.service.blobs import deletions
from ftune.service.blobs.keys import model_key, prefixes_of
from ftune.service.db.session import Database
from ftune.service.db.tables import TunedModel, utcnow
from ftune.service.ids import new_id
from ftune.service.job_status import JobKind, JobStatus
from ftune.service.lifecycle import transitions
from ftune.service.lifecycle.transitions import ClaimedJob
from ftune.service.logs import job_logging
from ftune.service.storage import Storage
from ftune.workers.failures import (
    describe_failure,
    halved_batch_spec,
    is_out_of_memory,
    is_transient,
    is_users_to_fix,
    release_memory,
)
from ftune.workers.placement import ONE_DEVICE, WorkerDevices
from ftune.workers.progress import JobHeartbeat, ProgressReporter
from ftune.workers.run_files import RunFiles
from ftune.workers.suggesting import run_suggestions

if TYPE_CHECKING:
    from ftune.models.training.fit import FitResult

log = logging.getLogger(__name__)

VERSION_RACE_RETRIES = 4

# What ``JobRunner.run`` returns besides the status the job ended in here.
SKIPPED = "skipped"  # not ours to run: missing, finished, cancelled or running elsewhere
SUPERSEDED = "superseded"  # another worker took the job over; its run and result stand


@dataclass(frozen=True)
class _RunInputs:
    resolved: dict  # the auto choices made at submit
    seconds_left: float  # of the job's run-time limit


class WorkerShuttingDown(Exception):
    """The run stopped because the worker is stopping; the job goes back to the queue."""


@dataclass(frozen=True)
class RunTimings:
    progress_s: float  # between batch-progress writes (FTUNE_PROGRESS_INTERVAL_S)
    cancel_poll_s: float  # between looks for a cancel request (FTUNE_CANCEL_POLL_S)
    heartbeat_s: float  # between heartbeats of the running job (FTUNE_WORKER_HEARTBEAT_S)
    stale_after_s: float  # a running job silent this long may be taken over (FTUNE_JOB_STALE_S)


@dataclass(frozen=True)
class RunLimits:
    max_runtime_s: float  # the service-wide cap; a job's own max_runtime_s may be lower
    max_attempts: int
    retry_backoff_s: float


class JobRunner:
    def __init__(self, db: Database, storage: Storage, *, worker_name: str,
                 timings: RunTimings, limits: RunLimits,
                 shutdown: threading.Event | None = None,
                 derived: DerivedStore | None = None,
                 devices: WorkerDevices = ONE_DEVICE) -> None:
        self.db, self.storage, self.worker_name = db, storage, worker_name
        self.devices = devices  # what a job may train on here (``ftune worker --devices``)
        self.timings = timings
        self.limits = limits
        self.shutdown = shutdown or threading.Event()
        # Decoded images and features kept for later jobs on the same data: the same
        # tenant's only (the job's tenant_id is its owner), unless the operator shares them.
        self.derived = derived

    def run(self, job_id: str) -> str:
        """Run the job until it leaves this worker, and say how: the status it ended in
        (succeeded, failed, cancelled, pruned), ``queued`` (a transient error: it is retried
        later), ``SUPERSEDED`` or ``SKIPPED``. A stopping worker raises ``WorkerShuttingDown``
        instead, after handing the job back to the queue."""
        job = self._claim(job_id)
        if job is None:
            return SKIPPED
        files = RunFiles(self.db, self.storage, self.worker_name, job_id, job.attempts)
        try:
            # Every line logged while it runs carries its id and tenant, and is kept (in the
            # store) for its logs.
            with job_logging(files.log_path, job_id, job.tenant_id):
                log.info("job %s attempt %d started on %s", job_id, job.attempts,
                         self.worker_name)
                try:
                    status = self._run_claimed(job, files)
                except BaseException as exc:  # handed back on shutdown, or a bug (failed)
                    log.info("job %s left this worker: %s", job_id, type(exc).__name__)
                    raise
                log.info("job %s ended: %s", job_id, status)
                return status
        finally:
            files.clean_up()

    def _run_claimed(self, job: ClaimedJob, files: RunFiles) -> str:
        job_id = job.id
        limit = min(self.limits.max_runtime_s, job.max_runtime_s or float("inf"))
        used = job.seconds_run  # time spent queued does not count
        reporter = ProgressReporter(self.db, job_id, self.worker_name,
                                    progress_s=self.timings.progress_s,
                                    cancel_poll_s=self.timings.cancel_poll_s,
                                    shutdown=self.shutdown,
                                    deadline=time.monotonic() + limit - used,
                                    trial=job.sweep_id is not None)
        try:
            with JobHeartbeat(self.db, reporter, self.timings.heartbeat_s):
                if job.kind == JobKind.SUGGEST:
                    ranked = run_suggestions(self.db, self.storage, self.derived, job, files,
                                             reporter, self.worker_name)
                    return JobStatus.SUCCEEDED if ranked else SUPERSEDED
                return self._train_with_oom_retry(job, files, reporter, limit - used)
        except TrainingCancelled:
            return self._stopped(job, files, reporter, limit)
        except Exception as exc:
            if (retried := self._retry_later(job, exc)) is not None:
                return retried
            if is_users_to_fix(exc):  # bad data, spec, weights, memory: one line, no traceback
                log.warning("job %s failed: %s", job_id, describe_failure(exc))
                return self._fail(files, describe_failure(exc))
            self._fail(files, describe_failure(exc))
            raise  # a bug: marked failed, and the task fails with its traceback (logged once)

    def _claim(self, job_id: str) -> ClaimedJob | None:
        with self.db.session() as session:
            job = transitions.claim(session, job_id, self.worker_name,
                                    self.timings.stale_after_s)
        if job is None:
            log.info("job %s skipped: missing, finished, cancelled or running elsewhere", job_id)
            with self.db.session() as session:
                if transitions.cancel_requested(session, job_id):  # cancelled while it was away
                    self._discard_checkpoints(job_id)
        return job

    def _stopped(self, job: ClaimedJob, files: RunFiles, reporter: ProgressReporter,
                 limit: float) -> str:
        """The run stopped at a batch boundary: taken over, pruned, over time, shutdown or
        cancel. Returns what ``run`` does, or raises ``WorkerShuttingDown``."""
        job_id = job.id
        if reporter.lost:
            # Another worker took the job over; its run, files and result stand.
            log.warning("job %s was taken over by another worker; stopping", job_id)
            return SUPERSEDED
        if reporter.pruned and not self.shutdown.is_set():
            return self._pruned(job, files)
        if reporter.over_time:
            return self._fail(files, f"exceeded its maximum run time of {limit:.0f} s "
                              "(max_runtime_s, FTUNE_MAX_RUNTIME_S); the last checkpoint "
                              "was discarded")
        if self.shutdown.is_set():
            with self.db.session() as session:
                handed_back = not transitions.cancel_requested(session, job_id)
                if handed_back:
                    transitions.requeue(session, job_id, "the worker stopped", self.worker_name)
            if handed_back:  # raised after the commit, not inside the transaction
                log.info("job %s handed back: the worker is stopping", job_id)
                raise WorkerShuttingDown(job_id) from None
        with self.db.session() as session:
            transitions.finish(session, job_id, JobStatus.CANCELLED,
                               error="cancelled while running", worker=self.worker_name)
        files.discard_checkpoints()
        log.info("job %s cancelled", job_id)
        return JobStatus.CANCELLED

    def _discard_checkpoints(self, job_id: str) -> None:
        """A job cancelled without this attempt's run: its checkpoints go (any attempt's)."""
        RunFiles(self.db, self.storage, self.worker_name, job_id, 0).discard_checkpoints()

    def _pruned(self, job: ClaimedJob, files: RunFiles) -> str:
        with self.db.session() as session:
            transitions.prune(session, job.id, self.worker_name, job.objective)
        files.discard_checkpoints()
        log.info("job %s pruned", job.id)
        return JobStatus.PRUNED

    def _retry_later(self, job: ClaimedJob, exc: Exception) -> str | None:
        """A transient error queues the job again, to be admitted no earlier than after a
        backoff (the dispatcher honours ``retry_at``): ``queued``; ``SUPERSEDED`` when
        another worker took the job over meanwhile (this host was cut off, say); None when
        the error is not one to retry."""
        if not is_transient(exc) or job.attempts >= self.limits.max_attempts:
            return None
        countdown = self.limits.retry_backoff_s * 2 ** (job.attempts - 1)
        with self.db.session() as session:
            requeued = transitions.requeue(
                session, job.id, worker=self.worker_name,
                retry_at=utcnow() + timedelta(seconds=countdown),
                reason=f"transient error, retrying in {countdown:.0f} s: "
                f"{describe_failure(exc)}")
        if not requeued:
            with self.db.session() as session:
                cancelled = transitions.cancel_requested(session, job.id)
            if cancelled:  # requeue ended it cancelled
                self._discard_checkpoints(job.id)
                return JobStatus.CANCELLED
            log.warning("job %s hit a transient error (%s) and was taken over by another "
                        "worker meanwhile; its run here ends", job.id, exc)
            return SUPERSEDED
        log.warning("job %s hit a transient error (%s); retrying in %.0f s", job.id, exc,
                    countdown)
        return JobStatus.QUEUED

    def _fail(self, files: RunFiles, message: str) -> str:
        with self.db.session() as session:
            transitions.finish(session, files.job_id, JobStatus.FAILED, error=message,
                               worker=self.worker_name)
        files.discard_checkpoints()
        return JobStatus.FAILED

    def _train_with_oom_retry(self, job: ClaimedJob, files: RunFiles,
                              reporter: ProgressReporter, seconds_left: float) -> str:
        """Train and store the model; returns ``succeeded`` or ``SUPERSEDED``."""
        job_id, spec_json = job.id, job.spec
        # Only the submit-time choices: what a run measures is measured again on each attempt.
        static = {k: v for k, v in job.resolved.items() if k in STATIC_FIELDS}
        run = _RunInputs(static, seconds_left)
        smaller = None
        try:
            return self._train(job, files, spec_json, reporter, run)
        except Exception as exc:
            smaller = halved_batch_spec(spec_json) if is_out_of_memory(exc) else None
            if smaller is None:
                raise
        # Retried outside the except block: the exception's traceback holds the failed run's
        # model, optimizer and batches, which must be freed first.
        release_memory()
        old, new = spec_json["batch_size"], smaller["batch_size"]
        log.warning("job %s ran out of memory at batch_size %d; retrying with %d", job_id,
                    old, new)
        # Checkpoints hold optimizer and schedule state for the old batch size.
        files.discard_checkpoints()
        with self.db.session() as session:
            transitions.replace_spec(session, job_id, smaller,
                                     f"out of memory at batch_size {old}; retrying once "
                                     f"with batch_size {new}")
        if reporter.deadline is not None:  # the retry has what is left of the run time
            run = replace(run, seconds_left=reporter.deadline - time.monotonic())
        return self._train(job, files, smaller, reporter, run)

    def _discard_model(self, model_id: str) -> None:
        """A stored bundle no row will point at: removed from the store at once, which needs no
        database (recording may have failed because the database is down: the soak found
        bundles left so). Its hold is then settled where the database answers; where neither
        answers, the upkeep removes what is left when the hold comes due."""
        prefixes = prefixes_of(models=[model_id])
        try:
            for prefix in prefixes:
                self.storage.blobs.delete_prefix(prefix)
        except Exception as exc:  # every backend's errors: the deletion below retries it
            log.warning("could not remove model %s's files now (scheduled): %s", model_id, exc)
        try:
            with self.db.session() as session:
                deletions.schedule(session, prefixes)  # the hold, due now
            deletions.remove(self.db, self.storage.blobs, prefixes)
        except Exception as exc:  # the database is down: the hold comes due by itself
            log.warning("model %s's hold is left to come due: %s", model_id, exc)

    def _record_success(self, job_id: str, attempt: int, record: TunedModel, best: dict,
                        result: FitResult) -> bool:
        held = prefixes_of(models=[record.id])
        for last in [False] * (VERSION_RACE_RETRIES - 1) + [True]:
            try:
                with self.db.session() as session:
                    recorded = transitions.succeed(
                        session, job_id, self.worker_name, record, best, result.stopped_early,
                        result.diagnosis, attempt=attempt)
                    if recorded:  # in the same transaction: the row and its bundle's keep
                        deletions.release(session, held)
                    return recorded
            except IntegrityError:
                if last:
                    raise
                # Another model of the same name took this version number; take the next.
                record = TunedModel(**{c.key: getattr(record, c.key)
                                       for c in TunedModel.__table__.columns})
        raise AssertionError("unreachable: the last try returns or raises")

    def _train(self, job: ClaimedJob, files: RunFiles, spec_json: dict,
               reporter: ProgressReporter, run: _RunInputs) -> str:
        """One training run with this spec; returns ``succeeded`` or ``SUPERSEDED``."""
        result = self._fit(job, files, spec_json, reporter, run)
        return self._store_model(job, files, result)

    def _fit(self, job: ClaimedJob, files: RunFiles, spec_json: dict,
             reporter: ProgressReporter, run: _RunInputs) -> FitResult:
        from ftune.models.parallel.launch import Devices, fit_on_devices
        from ftune.models.training.fit import fit

        spec = parse_spec(spec_json)  # stored JSON is validated again: it may predate a change
        data_dir = files.dataset_version(job.dataset_parts, job.tenant_id)
        unlabeled = (None if job.unlabeled_dataset_id is None else files.dataset(
            job.unlabeled_dataset_id, job.unlabeled_sha256, job.tenant_id))
        resume = files.restore_checkpoint()
        if resume is not None:
            self._record_missing_epochs(job.id, resume, reporter)
        callbacks = reporter.callbacks()
        callbacks.on_epoch_end, callbacks.on_pretrain_epoch = _shipped_first(reporter, files)
        devices = self._devices_for(spec, data_dir)
        resolved = run.resolved | {"devices": devices.to_dict()}
        if devices.value > 1:
            log.info("job %s trains on %d %s devices", job.id, devices.value, self.devices.kind)
            return fit_on_devices(Devices(devices.value, self.devices.kind), data_dir, spec,
                                  folder=files.folder / "ranks",
                                  checkpoint_dir=files.checkpoints, resume=resume,
                                  callbacks=callbacks, resolved=resolved,
                                  time_limit_s=run.seconds_left, derived=self.derived,
                                  owner=job.tenant_id)
        return fit(data_dir, spec, checkpoint_dir=files.checkpoints, resume=resume,
                   callbacks=callbacks, resolved=resolved,
                   time_limit_s=run.seconds_left, derived=self.derived,
                   owner=job.tenant_id,  # whose cache entries this job makes
                   unlabeled=unlabeled)

    def _devices_for(self, spec: FineTuneSpec, data_dir: Path) -> Choice:
        """How many of this worker's devices the job trains on (``rules.devices``)."""
        have = self.devices
        if isinstance(spec.devices, int) and spec.devices > have.count:
            raise ResourceError(f"the job asks for {spec.devices} devices (devices) but this "
                                f"worker has {have.count}; start workers with --devices")
        needs_count = spec.devices == "auto" and have.count > 1 and have.kind == "cuda"
        # Counting the images walks the dataset: only when the rule needs them.
        num_train = len(scan_image_folder(data_dir).train) if needs_count else 0
        return rules.devices(spec.devices, have.count, device_type=have.kind,
                             trains_backbone=not spec.head_alone, num_train=num_train,
                             batch_size=spec.batch_size, uses_unlabeled=spec.uses_unlabeled)

    def _record_missing_epochs(self, job_id: str, resume: Path,
                               reporter: ProgressReporter) -> None:
        """Rows of the epochs the checkpoint holds that the database lacks: the attempt that
        stored it was cut off before it recorded its last epoch."""
        from ftune.models.training.checkpoint import last_history

        history = last_history(resume)  # its pseudo-labelling rounds' epochs too
        with self.db.session() as session:
            recorded = transitions.recorded_epochs(session, job_id)
        for row in history:
            if int(row["epoch"]) not in recorded:
                log.info("job %s: recording epoch %s from the checkpoint", job_id, row["epoch"])
                reporter.on_epoch_end(row)

    def _store_model(self, job: ClaimedJob, files: RunFiles, result: FitResult) -> str:
        """Store the bundle, then record the model; the bundle goes if recording fails.
        Returns ``succeeded``, or ``SUPERSEDED`` when the job is no longer ours to finish."""
        from ftune.models.bundle import save_bundle

        job_id, model_id = job.id, new_id()
        key = model_key(model_id)
        bundle = files.folder / "bundle"
        try:
            save_bundle(result, bundle)
            # Held first: if this process dies before the row is recorded, the bundle goes.
            with self.db.session() as session:
                deletions.hold(session, prefixes_of(models=[model_id]))
            # Whole or not at all: no reader sees a part of it, and no row points at it yet.
            stored = self.storage.put_tree(key, bundle)
        finally:
            remove_tree(bundle)
        best = {"epoch": result.best_epoch,
                "val_accuracy": result.best_metrics.get("val_accuracy"),
                "val_loss": result.best_metrics.get("val_loss")}
        if "val_map" in result.best_metrics:
            best["val_map"] = result.best_metrics["val_map"]
        record = TunedModel(
            id=model_id, tenant_id=job.tenant_id, job_id=job_id, name=job.model_name,
            dataset_id=job.dataset_id,
            size_bytes=stored.size, blob_sha256=stored.sha256, dataset_hash=result.dataset_hash,
            backbone=result.backbone, classes=result.classes, task=result.task,
            spec=result.spec.model_dump(mode="json"), metrics=_model_metrics(result))
        try:
            recorded = self._record_success(job_id, job.attempts, record, best, result)
        except BaseException:
            self._discard_model(model_id)
            raise
        if not recorded:
            # Another worker took the job over (we were thought dead); its result stands.
            self._discard_model(model_id)
            log.warning("job %s is no longer ours to finish; model discarded", job_id)
            return SUPERSEDED
        files.discard_checkpoints()
        log.info("job %s succeeded: model %s", job_id, model_id)
        return JobStatus.SUCCEEDED


def _shipped_first(reporter: ProgressReporter, files: RunFiles
                   ) -> tuple[Callable[[dict], None], Callable[[dict], None]]:
    """The ends of an epoch and of a pretraining epoch: the checkpoint stored first, then
    the row recorded, so a row is never seen without the checkpoint another host resumes
    from (a run is never set back behind what users saw). Storing is refused once another
    attempt owns the job: the run stops at the next batch."""
    def stored() -> bool:
        if reporter.lost or not files.ship_checkpoint():
            reporter.lost = True
            return False
        return True

    def on_epoch_end(row: dict) -> None:
        if stored():
            reporter.on_epoch_end(row)
        files.ship_log()

    def on_pretrain_epoch(row: dict) -> None:
        if stored():
            reporter.on_pretrain_epoch(row)

    return on_epoch_end, on_pretrain_epoch


def _model_metrics(result: FitResult) -> dict:
    return {"best_epoch": result.best_epoch, "best": result.best_metrics,
            "stopped_early": result.stopped_early, "epochs_run": len(result.history),
            "num_train": result.num_train, "num_val": result.num_val,
            "device": result.device, "precision": result.precision,
            "train_seconds": round(result.seconds, 3),
            "calibration": {k: result.calibration.get(k) for k in ("temperature", "kept")}
            if result.calibration else None}
