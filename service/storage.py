"""Where things live under the data directory. Every path is built from a server-made id."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

from ftune.models.data.trees import remove_tree
from ftune.models.export_formats import EXPORT_SUFFIXES, export_suffix
from ftune.service.ids import is_id

log = logging.getLogger(__name__)


def _checked(object_id: str) -> str:
    # Ids come from our own database, but a path must never be built from anything else.
    if not is_id(object_id):
        raise ValueError(f"not a valid id: {object_id!r}")
    return object_id


class Storage:
    def __init__(self, home: Path) -> None:
        self.home = home

    @property
    def datasets(self) -> Path:
        return self.home / "datasets"

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def jobs(self) -> Path:
        return self.home / "jobs"

    @property
    def uploads(self) -> Path:
        return self.home / "uploads"

    @property
    def exports(self) -> Path:
        return self.home / "exports"

    @property
    def cache(self) -> Path:
        """Things derived from datasets (decoded images), kept for later jobs."""
        return self.home / "cache"

    @property
    def tmp(self) -> Path:
        return self.home / "tmp"

    def prepare(self) -> None:
        for folder in (self.datasets, self.models, self.jobs, self.uploads, self.exports,
                       self.tmp):
            folder.mkdir(parents=True, exist_ok=True)

    def sweep_stale(self, max_age_s: float = 24 * 3600) -> int:
        """Remove what a crashed process left: upload parts and unpacking folders; how many.

        Only old ones: another API process sharing this directory may be mid-upload. Never
        raises (the API calls it at start-up): what cannot be removed is logged and left.
        """
        cutoff = time.time() - max_age_s
        removed = 0
        for folder, pattern in ((self.uploads, "*.part"), (self.datasets, ".*.staging"),
                                (self.tmp, "deleted-*")):
            try:
                stale = [p for p in folder.glob(pattern) if _older_than(p, cutoff)]
            except OSError as exc:
                log.warning("cannot look for leftovers in %s: %s", folder, exc)
                continue
            removed += sum(_remove_leftover(path) for path in stale)
        return removed

    def dataset_dir(self, dataset_id: str) -> Path:
        """The unpacked images of a dataset (what the engine reads)."""
        return self.datasets / _checked(dataset_id)

    def model_dir(self, model_id: str) -> Path:
        """The tuned-model bundle that ``models.Predictor.load`` reads."""
        return self.models / _checked(model_id)

    def job_dir(self, job_id: str) -> Path:
        """A job's files: per-epoch checkpoints while it runs, and its log lines."""
        return self.jobs / _checked(job_id)

    def job_log(self, job_id: str) -> Path:
        """The job's worker log lines (JSON), for GET /v1/jobs/{id}/logs; kept until the job
        is deleted."""
        return self.job_dir(job_id) / "log.jsonl"

    def checkpoint_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "checkpoints"

    def model_zip(self, model_id: str) -> Path:
        return self.export_file(model_id, "safetensors")

    def export_file(self, model_id: str, fmt: str) -> Path:
        """Where the model's download in ``fmt`` is kept (built or not)."""
        return self.exports / f"{_checked(model_id)}{export_suffix(fmt)}"

    def export_files(self, model_id: str) -> list[Path]:
        """The model's downloads that exist, in any format."""
        stem = _checked(model_id)
        return [p for p in (self.exports / f"{stem}{s}" for s in EXPORT_SUFFIXES) if p.is_file()]

    def remove_dataset_files(self, dataset_id: str) -> None:
        # Renamed first so the delete is atomic from a reader's view, then removed.
        folder = self.dataset_dir(dataset_id)
        if folder.exists():
            # A unique name: an earlier trash folder of this id may not have gone away.
            trash = self.tmp / f"deleted-{dataset_id}-{uuid.uuid4().hex[:8]}"
            folder.rename(trash)
            remove_tree(trash)

    def remove_model_files(self, model_id: str) -> None:
        for path in self.export_files(model_id):
            path.unlink(missing_ok=True)
        remove_tree(self.model_dir(model_id))

    def folder_bytes(self, folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    def remove_job_files(self, job_id: str) -> None:
        """Everything of a deleted job, its log included."""
        remove_tree(self.job_dir(job_id))

    def remove_checkpoints(self, job_id: str) -> None:
        """A finished job's checkpoints (its log stays)."""
        remove_tree(self.checkpoint_dir(job_id))


def _remove_leftover(path: Path) -> bool:
    try:
        return remove_tree(path)  # logs what it cannot remove
    except Exception:  # start-up must go on whatever a leftover holds
        log.exception("could not remove the leftover %s", path)
        return False


def _older_than(path: Path, cutoff: float) -> bool:
    try:
        return path.lstat().st_mtime < cutoff
    except OSError:  # gone meanwhile (another process swept it)
        return False
