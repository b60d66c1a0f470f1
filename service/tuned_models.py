"""Tuned-model service functions: look up, export as a zip, and load for predictions."""

from __future__ import annotations

import os
import re
import threading
import uuid
import zipfile
from collections import OrderedDict
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ftune.models.bundle import BUNDLE_FILES, EVALUATION_FILE
from ftune.service.batching import TORCH_THREAD, DynamicBatcher
from ftune.service.db.tables import ModelAlias, TunedModel
from ftune.service.errors import InvalidInput, NotFound
from ftune.service.ids import is_id
from ftune.service.storage import Storage

EXTRA_FILES = (EVALUATION_FILE,)  # in the download beside what Predictor.load reads
ALIAS = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")


def get_model(session: Session, ref: str) -> TunedModel:
    """A model by id, ``name:version`` or ``name:alias``."""
    model = None
    if is_id(ref):
        model = session.get(TunedModel, ref)
    elif ":" in ref:
        name, tag = ref.rsplit(":", 1)
        if tag.isascii() and tag.isdigit():
            if len(tag) > 9:
                raise NotFound(f"model {ref} not found (no such version)")
            model = session.scalar(select(TunedModel).where(TunedModel.name == name,
                                                            TunedModel.version == int(tag)))
        else:
            alias = session.get(ModelAlias, (name, tag))
            model = session.get(TunedModel, alias.model_id) if alias else None
    if model is None:
        raise NotFound(f"model {ref} not found (use an id, name:version or name:alias)")
    return model


def set_alias(session: Session, *, alias: str, ref: str) -> ModelAlias:
    if not ALIAS.match(alias) or alias.isdigit():  # ASCII only, so isdigit means a version
        raise InvalidInput("alias must be 1 to 100 letters, digits, '-', '_' or '.', and not "
                           "only digits (those are versions)")
    model = get_model(session, ref)
    row = session.get(ModelAlias, (model.name, alias))
    if row is None:
        try:
            with session.begin_nested():  # a concurrent PUT may create it first
                row = ModelAlias(name=model.name, alias=alias, model_id=model.id)
                session.add(row)
            return row
        except IntegrityError:
            row = session.get(ModelAlias, (model.name, alias), populate_existing=True)
    row.model_id = model.id
    session.flush()
    return row


def aliases_of(session: Session, model: TunedModel) -> list[str]:
    return sorted(session.scalars(select(ModelAlias.alias).where(
        ModelAlias.name == model.name, ModelAlias.model_id == model.id)))


def list_models(session: Session, *, limit: int = 100) -> list[TunedModel]:
    return list(session.scalars(select(TunedModel).order_by(TunedModel.created_at.desc())
                                .limit(limit)))


def model_view(model: TunedModel, aliases: list[str] | None = None) -> dict:
    return {"id": model.id, "name": model.name, "version": model.version,
            "aliases": aliases or [], "job_id": model.job_id, "dataset_id": model.dataset_id,
            "dataset_hash": model.dataset_hash,
            "backbone": model.backbone, "classes": model.classes, "metrics": model.metrics,
            "spec": model.spec, "created_at": model.created_at}


def bundle_folder(storage: Storage, model_id: str) -> Path:
    """The model's bundle folder; 404 when its files are not on this server."""
    folder = storage.model_dir(model_id)
    missing = [name for name in BUNDLE_FILES if not (folder / name).is_file()]
    if missing:
        raise NotFound(f"model {model_id} has no files on this server (missing "
                       f"{', '.join(missing)}); was the data directory moved?")
    return folder


def model_export(storage: Storage, model_id: str, fmt: str) -> Path:
    """The model as ONNX or TorchScript, built once and kept (models never change)."""
    from ftune.models.export import SUFFIXES, export_model

    target = storage.exports / f"{model_id}{SUFFIXES[fmt]}"
    if not target.exists():
        source = bundle_folder(storage, model_id)
        TORCH_THREAD.submit(export_model, source, target, fmt).result()
    return target


def model_zip(storage: Storage, model_id: str) -> Path:
    """The bundle as a zip, built once (models never change) and renamed into place."""
    target = storage.model_zip(model_id)
    if target.exists():
        return target
    source = bundle_folder(storage, model_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    try:
        # Weights are already dense floats: storing them uncompressed is as small and faster.
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            for name in BUNDLE_FILES + EXTRA_FILES:
                if (source / name).is_file():
                    archive.write(source / name, arcname=name)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


class PredictorCache:
    """Loaded models (each with its batcher) kept in the API process, bounded by memory:
    least recently used evicted first. A per-model lock makes concurrent first requests load
    the model once."""

    def __init__(self, storage: Storage, max_bytes: int, *, max_batch: int = 32,
                 max_wait_ms: float = 5.0) -> None:
        self.storage, self.max_bytes = storage, max_bytes
        self.max_batch, self.max_wait_ms = max_batch, max_wait_ms
        self._loaded: OrderedDict[str, DynamicBatcher] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.loads = 0
        self._evicted_batches = self._evicted_images = 0

    def get(self, model_id: str) -> DynamicBatcher:
        with self._lock:
            if model_id in self._loaded:
                self._loaded.move_to_end(model_id)
                return self._loaded[model_id]
            loading = self._loading.setdefault(model_id, threading.Lock())
        with loading:
            with self._lock:
                if model_id in self._loaded:
                    return self._loaded[model_id]
            from ftune.models.predictor import Predictor  # torch loads on the first predict only

            folder = bundle_folder(self.storage, model_id)
            predictor = TORCH_THREAD.submit(Predictor.load, folder).result()
            batcher = DynamicBatcher(predictor, max_batch=self.max_batch,
                                     max_wait_ms=self.max_wait_ms)
            with self._lock:
                self.loads += 1
                self._loaded[model_id] = batcher
                self._sizes[model_id] = predictor.memory_bytes()
                # Keep at least the newest model, even when it alone is over the budget.
                while sum(self._sizes.values()) > self.max_bytes and len(self._loaded) > 1:
                    evicted, old = self._loaded.popitem(last=False)
                    self._sizes.pop(evicted, None)
                    self._evicted_batches += old.batches
                    self._evicted_images += old.images
                    old.close()
                self._loading.pop(model_id, None)
            return batcher

    def peek(self, model_id: str) -> DynamicBatcher | None:
        """The loaded model, if it is (marked as just used); never loads."""
        with self._lock:
            if model_id in self._loaded:
                self._loaded.move_to_end(model_id)
            return self._loaded.get(model_id)

    @property
    def batches(self) -> int:
        return self._evicted_batches + sum(b.batches for b in list(self._loaded.values()))

    @property
    def images(self) -> int:
        return self._evicted_images + sum(b.images for b in list(self._loaded.values()))

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def __len__(self) -> int:
        return len(self._loaded)
