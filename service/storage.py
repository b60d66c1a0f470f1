"""Where things live under the data directory. Every path is built from a server-made id."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ftune.service.ids import is_id

EXPORT_SUFFIXES = (".zip", ".onnx", ".pt")  # the bundle zip and ftune.models.export's formats


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
    def tmp(self) -> Path:
        return self.home / "tmp"

    def prepare(self) -> None:
        for folder in (self.datasets, self.models, self.jobs, self.uploads, self.exports,
                       self.tmp):
            folder.mkdir(parents=True, exist_ok=True)

    def sweep_stale(self, max_age_s: float = 24 * 3600) -> int:
        """Remove what a crashed process left: upload parts and unpacking folders.

        Only old ones: another API process sharing this directory may be mid-upload.
        """
        cutoff = time.time() - max_age_s
        stale = [p for p in self.uploads.glob("*.part") if p.stat().st_mtime < cutoff]
        stale += [p for p in self.datasets.glob(".*.staging") if p.stat().st_mtime < cutoff]
        stale += [p for p in self.tmp.glob("deleted-*") if p.stat().st_mtime < cutoff]
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return len(stale)

    def dataset_dir(self, dataset_id: str) -> Path:
        """The unpacked images of a dataset (what the engine reads)."""
        return self.datasets / _checked(dataset_id)

    def model_dir(self, model_id: str) -> Path:
        """The tuned-model bundle that ``models.Predictor.load`` reads."""
        return self.models / _checked(model_id)

    def job_dir(self, job_id: str) -> Path:
        """A job's working files: per-epoch checkpoints while it runs."""
        return self.jobs / _checked(job_id)

    def checkpoint_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "checkpoints"

    def model_zip(self, model_id: str) -> Path:
        return self.exports / f"{_checked(model_id)}.zip"

    def export_files(self, model_id: str) -> list[Path]:
        """The model's downloads that exist: zip, ONNX, TorchScript."""
        stem = _checked(model_id)
        return [p for p in (self.exports / f"{stem}{s}" for s in EXPORT_SUFFIXES) if p.is_file()]

    def remove_dataset_files(self, dataset_id: str) -> None:
        # Renamed first so the delete is atomic from a reader's view, then removed.
        folder = self.dataset_dir(dataset_id)
        if folder.exists():
            trash = self.tmp / f"deleted-{dataset_id}"
            folder.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    def remove_model_files(self, model_id: str) -> None:
        for path in self.export_files(model_id):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.model_dir(model_id), ignore_errors=True)

    def folder_bytes(self, folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    def remove_job_files(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
