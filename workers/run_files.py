"""A run's files, on this host and in the blob store. The worker's host shares nothing with
the API's but the store: the dataset is fetched from it (once per host, see
``Storage.local_tree``), the last checkpoint of an earlier attempt is restored from it, and
each epoch's checkpoint and the log lines go back to it as the run goes, so a job resumes on
any host. A stale attempt (its host cut off while another worker took the job over) writes
no checkpoint: the database says whether this attempt still owns the job, and the key
carries the attempt number, so it could not overwrite a later attempt's anyway."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from ftune.models.data.trees import remove_tree
from ftune.models.errors import DatasetError
from ftune.models.training.checkpoint import CHECKPOINT_NAME
from ftune.service.blobs import deletions
from ftune.service.blobs.base import BlobMissing
from ftune.service.blobs.keys import (
    attempt_of,
    checkpoint_key,
    checkpoints_prefix,
    dataset_key,
    log_key,
)
from ftune.service.blobs.tarred import untar
from ftune.service.db.session import Database
from ftune.service.lifecycle import transitions
from ftune.service.storage import Storage

log = logging.getLogger(__name__)


class RunFiles:
    def __init__(self, db: Database, storage: Storage, worker: str, job_id: str,
                 attempt: int) -> None:
        self.db, self.storage, self.worker = db, storage, worker
        self.job_id, self.attempt = job_id, attempt

    @property
    def folder(self) -> Path:
        """This attempt's files on this host (per attempt: a stale attempt on the same host
        never writes into a later one's)."""
        return self.storage.job_dir(self.job_id) / f"attempt-{self.attempt:04d}"

    @property
    def checkpoints(self) -> Path:
        """The run's checkpoint folder on this host (the engine writes it every epoch)."""
        return self.folder / "checkpoints"

    @property
    def log_path(self) -> Path:
        """This attempt's log lines on this host."""
        return self.folder / "log.jsonl"

    def clean_up(self) -> None:
        """Ship the log one last time and remove this attempt's files from this host."""
        self.ship_log(final=True)
        remove_tree(self.folder)
        with contextlib.suppress(OSError):  # another attempt's files are still there
            self.folder.parent.rmdir()

    def dataset(self, dataset_id: str, sha256: str | None, owner: str) -> Path:
        """The dataset's images on this host, fetched from the store unless cached here."""
        if sha256 is None:
            raise DatasetError(f"dataset {dataset_id} no longer exists on the server")
        try:
            return self.storage.local_tree(dataset_key(dataset_id), sha256, owner=owner)
        except BlobMissing:
            raise DatasetError(f"dataset {dataset_id} no longer exists in the store") from None

    def dataset_version(self, parts: list[tuple[str, str | None]], owner: str) -> Path:
        """A dataset's images on this host from its chain of versions (oldest first), each
        fetched from the store unless cached here."""
        if not parts:
            raise DatasetError("the job's dataset no longer exists on the server")
        try:
            return self.storage.local_dataset(parts, owner=owner)
        except BlobMissing:
            raise DatasetError(f"dataset {parts[-1][0]} (or a version it was made from) no "
                               "longer exists in the store") from None

    def restore_checkpoint(self) -> Path | None:
        """The last checkpoint an earlier attempt stored, unpacked into ``checkpoints``
        (emptied first: what this host kept may be older); None when there is none."""
        remove_tree(self.checkpoints)
        earlier = sorted((a, k) for k in self.storage.blobs.keys(checkpoints_prefix(self.job_id))
                         if (a := attempt_of(k)) is not None and a < self.attempt)
        for attempt, key in reversed(earlier):
            archive = self.storage.tmp / f"{self.job_id}-{attempt:04d}.tar"
            try:
                self.storage.blobs.download(key, archive)
                self.checkpoints.mkdir(parents=True, exist_ok=True)
                untar(archive, self.checkpoints)
            except BlobMissing:  # removed meanwhile: try the one before
                continue
            finally:
                archive.unlink(missing_ok=True)
            if (self.checkpoints / CHECKPOINT_NAME).is_file():
                log.info("job %s resumes from its last checkpoint (attempt %d's)", self.job_id,
                         attempt)
                return self.checkpoints
        return None

    def ship_checkpoint(self) -> bool:
        """Store this epoch's checkpoint under this attempt's key, if the attempt still owns
        the job; False (nothing written) when it does not."""
        with self.db.session() as session:
            if not transitions.owns(session, self.job_id, self.worker, self.attempt):
                log.warning("job %s: attempt %d no longer owns the job; checkpoint not stored",
                            self.job_id, self.attempt)
                return False
        key = checkpoint_key(self.job_id, self.attempt)
        self.storage.put_tree(key, self.checkpoints)
        # Checked again: the upload may have hung while this host was cut off, and finished
        # once it was back, after another attempt took the job over (and perhaps finished it
        # and removed its checkpoints). Then what it wrote goes.
        with self.db.session() as session:
            still_ours = transitions.owns(session, self.job_id, self.worker, self.attempt)
        if not still_ours:
            log.warning("job %s: attempt %d lost the job while storing its checkpoint; "
                        "removed", self.job_id, self.attempt)
            self.storage.blobs.delete(key)
        return still_ours

    def ship_log(self, *, final: bool = False) -> None:
        """Store this attempt's log lines so far (the API reads them from the store). The
        ``final`` lines go after the job has ended, when it may be deleted at once: a log
        written after its row is gone is removed again (the soak found one left behind)."""
        if not self.log_path.is_file():
            return
        key = log_key(self.job_id, self.attempt)
        try:
            self.storage.blobs.put_file(key, self.log_path)
            if not final:  # the job runs: it cannot be deleted meanwhile
                return
            with self.db.session() as session:
                deleted = transitions.job_gone(session, self.job_id)
            if deleted:
                self.storage.blobs.delete(key)
        except Exception as exc:  # the log is worth a warning, never the job
            log.warning("job %s: could not store its log lines: %s", self.job_id, exc)

    def discard_checkpoints(self) -> None:
        """The job is over (or its checkpoints no longer fit it): none are kept, here or in
        the store. What the store refuses now, the API's upkeep removes later."""
        remove_tree(self.checkpoints)
        prefix = checkpoints_prefix(self.job_id)
        with self.db.session() as session:
            deletions.schedule(session, [prefix])
        deletions.remove(self.db, self.storage.blobs, [prefix])
