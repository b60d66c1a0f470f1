"""Which engine serves each loaded model (``FTUNE_SERVE_ENGINE``), and the one-off
preparation that lets ONNX Runtime serve it.

The preparation is ``ftune serving-check`` (models/serving/prepare.py) in a child process,
holding a slot as exports do (slots of its own, ``FTUNE_EXPORTS_AT_ONCE`` of them): the ONNX
export, its parity check against the torch model on the model's own images (its dataset,
fetched from the store), and the int8 model with its guard. Its files are stored once, as
one tar under the model's exports (they count against the tenant's storage like a download,
and go with the model); its figures go on the model's row, so every API process serves the
model the same way without checking again.

Under ``auto`` and ``int8`` the first load of an unprepared model is served by torch at once
while the preparation runs in the background; the engine changes between two forwards once it
passes. Under ``onnxruntime`` the first load waits for it, and a model that fails it is refused.
"""

from __future__ import annotations

import json
import logging
import queue
import tempfile
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from ftune.models.serving.engines import REPORT_FILE, TORCH, choose
from ftune.models.serving.lanes import LaneLayout
from ftune.service.blobs.base import BlobMissing
from ftune.service.blobs.keys import serving_key
from ftune.service.dataset_versions import parts_of
from ftune.service.db.session import Database
from ftune.service.db.tables import Dataset, Tenant, TunedModel
from ftune.service.disk import disk_allowance
from ftune.service.errors import NotFound, TooManyRequests, Unavailable
from ftune.service.exports import ExportSlots, run_engine_child
from ftune.service.quotas import limits_of, usage_of
from ftune.service.settings import Settings
from ftune.service.storage import Storage
from ftune.service.tuned_models import bundle_folder, record_exports, report_of

if TYPE_CHECKING:
    from ftune.models.predictor import Predictor
    from ftune.models.serving.onnx_runner import OnnxRunner

log = logging.getLogger(__name__)

WHAT = "the serving preparation (ONNX export, parity check, int8)"
BACKGROUND_SLOT_WAIT_S = 3600.0  # a background preparation queues for a slot this long


# The fastest forward size by (engine, provider, architecture, input size, device, lanes),
# measured once in this process where the model's preparation did not measure it here: it
# depends on the network's shape and the host, not on the tuned weights.
_batch_sizes: dict[tuple[str, str, str, int, str, LaneLayout], int] = {}
_measure_lock = threading.Lock()


def measured_batch_size(predictor: Predictor, layout: LaneLayout, engine: str = TORCH,
                        runner: OnnxRunner | None = None) -> int:
    """The forward size ``engine`` (``runner``, or torch) runs fastest at in ``layout``'s
    lanes (about 2 s the first time: models/serving/batch_size.py)."""
    from ftune.models.serving.batch_size import measure_model_batch_sizes, provider_of

    key = (engine, provider_of(predictor, runner), str(predictor.config.get("backbone")),
           predictor.preprocessing.input_size, str(predictor.device), layout)
    with _measure_lock:  # one measurement per key, whichever loads come at once
        if key not in _batch_sizes:
            measured = measure_model_batch_sizes(predictor, layout, runner)
            _batch_sizes[key] = int(measured["size"])
            log.info("%s (%s) serves %s at %d px on %s (%s) %d image(s) at a time (images/s "
                     "by size: %s)", *key, measured["size"], measured["images_per_s"])
    return _batch_sizes[key]


def serve_with_torch(predictor: Predictor, layout: LaneLayout) -> None:
    predictor.serve_with(None, TORCH, measured_batch_size(predictor, layout))


class ServingEngines:
    def __init__(self, db: Database, storage: Storage, settings: Settings,
                 slots: ExportSlots) -> None:
        self.db, self.storage, self.settings, self.slots = db, storage, settings, slots
        self.policy: str = settings.serve_engine
        self._pending: set[str] = set()  # models being prepared in the background here
        self._lock = threading.Lock()
        # One daemon thread prepares in the background, in turn: it never holds up the
        # process's exit (a pool's threads are joined at exit; its child is killed then).
        # The queue holds the loaded predictors weakly: one the model cache evicts while its
        # model waits its turn is freed then, not kept until the preparation runs.
        self._queue: queue.SimpleQueue[tuple[TunedModel, weakref.ref[Predictor],
                                             LaneLayout]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.on_change: Callable[[str], None] | None = None  # a model's engine changed

    def attach(self, model: TunedModel, predictor: Predictor, layout: LaneLayout) -> None:
        """Set the engine of a model just loaded, to be served in ``layout``'s lanes; may
        start (or, under ``onnxruntime``, wait for) its preparation. 503 naming why where
        ``onnxruntime`` refuses it."""
        serving = model.serving
        if serving is None and self.policy == "onnxruntime":
            serving = self.prepare(model)
        elif serving is None and self.policy != "torch":
            self._prepare_later(model, predictor, layout)
        self._apply(model, serving, predictor, layout)

    def _apply(self, model: TunedModel, serving: dict | None, predictor: Predictor,
               layout: LaneLayout) -> None:
        choice = choose(self.policy, report_of(serving))
        if choice.engine is None:
            raise Unavailable(f"model {model.id} cannot be served under "
                              f"FTUNE_SERVE_ENGINE=onnxruntime: {choice.why}")
        if choice.file is None or serving is None:
            serve_with_torch(predictor, layout)
            return
        from ftune.models.serving.onnx_runner import OnnxRunner

        try:
            folder = self.storage.local_tree(serving_key(model.id), serving["sha256"],
                                             owner=model.tenant_id)
            runner = OnnxRunner(folder / choice.file, threads=layout.widths,
                                device=str(predictor.device))
        except Exception as exc:  # its files gone or damaged: torch, unless it is forced
            if self.policy == "onnxruntime":
                raise Unavailable(f"model {model.id}'s ONNX Runtime files cannot be loaded: "
                                  f"{exc}") from exc
            log.warning("model %s stays on torch: its ONNX Runtime files cannot be loaded: %s",
                        model.id, exc)
            serve_with_torch(predictor, layout)
            return
        size = (runner.batch_size(choice.batch, layout)  # measured here by the preparation
                or measured_batch_size(predictor, layout, choice.engine, runner))
        predictor.serve_with(runner, choice.engine, size)
        log.info("model %s is served by %s, %s at a time (%s)", model.id, choice.engine,
                 predictor.batch_size or "the whole batch", choice.why)

    def _prepare_later(self, model: TunedModel, predictor: Predictor,
                       layout: LaneLayout) -> None:
        with self._lock:
            if model.id in self._pending:
                return
            self._pending.add(model.id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._prepare_in_turn, daemon=True,
                                                name="serving-prep")
                self._thread.start()
        self._queue.put((model, weakref.ref(predictor), layout))

    def _prepare_in_turn(self) -> None:
        while True:
            self._prepare_and_apply(*self._queue.get())

    def _prepare_and_apply(self, model: TunedModel, loaded: weakref.ref[Predictor],
                           layout: LaneLayout) -> None:
        try:
            serving = self.prepare(model, wait_s=BACKGROUND_SLOT_WAIT_S)
            predictor = loaded()
            if predictor is None:  # evicted meanwhile: its next load reads the row's files
                return
            self._apply(model, serving, predictor, layout)
            if self.on_change is not None:
                self.on_change(model.id)
        except Exception as exc:  # torch keeps serving; the next load of the model tries again
            log.warning("model %s stays on torch: %s failed: %s", model.id, WHAT, exc)
        finally:
            with self._lock:
                self._pending.discard(model.id)

    def prepare_for_request(self, model: TunedModel) -> dict:
        """What a request that needs the preparation (the int8 download) waits on: one of
        this model already under way here is waited for; otherwise a busy slot is a 503."""
        with self._lock:
            under_way = model.id in self._pending
        return self.prepare(model, self.settings.export_timeout_s if under_way else None)

    def prepare(self, model: TunedModel, wait_s: float | None = None) -> dict:
        """The model's serving preparation, made now if no process has made it; its row's
        ``serving``. 503 when every export slot stays busy, 429 over the storage quota."""
        if (done := self._serving_of(model.id)) is not None:
            return done
        with self.slots.slot(wait_s):
            with self.db.session() as session:
                row = session.get(TunedModel, model.id)
                if row is None:
                    raise NotFound(f"model {model.id} was deleted")
                if row.serving is not None:  # another process made it meanwhile
                    return row.serving
                self._check_room(session, model)
                data = self._dataset_folder(session, session.get(Dataset, model.dataset_id))
            return self._build(model, data)

    def _serving_of(self, model_id: str) -> dict | None:
        with self.db.session() as session:
            row = session.get(TunedModel, model_id)
            if row is None:
                raise NotFound(f"model {model_id} was deleted")
            return row.serving

    def _check_room(self, session: Session, model: TunedModel) -> None:
        usage = usage_of(session, model.tenant_id)
        limits = limits_of(session.get(Tenant, model.tenant_id), self.settings)
        disk_allowance(self.storage, self.settings, WHAT)
        if usage.stored_bytes >= limits.stored_bytes:
            raise TooManyRequests(f"quota stored_gb exceeded: {WHAT} needs space and the "
                                  f"tenant holds {usage.stored_bytes} of "
                                  f"{limits.stored_bytes} bytes")

    def _dataset_folder(self, session: Session, dataset: Dataset | None) -> Path | None:
        """The model's dataset on this host (its images are what parity is checked on);
        None when it was deleted."""
        if dataset is None:
            return None
        try:
            return self.storage.local_dataset(parts_of(session, dataset),
                                              owner=dataset.tenant_id)
        except BlobMissing:  # its images are gone from the store
            return None

    def _build(self, model: TunedModel, data: Path | None) -> dict:
        bundle = bundle_folder(self.storage, model)
        with tempfile.TemporaryDirectory(dir=self.storage.tmp) as scratch:
            out = Path(scratch) / "serving"
            args = ["serving-check", str(bundle), "--out", str(out),
                    "--lanes", str(self.settings.serve_lanes)]
            run_engine_child(args + (["--data", str(data)] if data else []), WHAT,
                             timeout_s=self.settings.export_timeout_s)
            report = json.loads((out / REPORT_FILE).read_text())
            stored = self.storage.put_tree(serving_key(model.id), out)
        serving = {"report": report, "sha256": stored.sha256, "size": stored.size}
        record_exports(self.db, self.storage, model.id, f"{WHAT} ran", serving=serving)
        log.info("model %s prepared for ONNX Runtime: %s", model.id, report)
        return serving

