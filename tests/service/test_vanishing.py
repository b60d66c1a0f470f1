"""A row or an object deleted under a request is a 404 (or a 409) naming what vanished, never
a 500: models deleted while they are downloaded and used for predictions, jobs deleted while
their logs are read. Real API process, real database and blob store; the models are
registered in team-a as a worker leaves them, each a copy of the session's tiny model."""

from __future__ import annotations

import io
import itertools
import json
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from PIL import Image

from ftune.models.derived.store import DerivedStore
from ftune.processes import wait_until
from ftune.service.auth.principal import LOCAL_USER
from ftune.service.auth.tenants import get_tenant
from ftune.service.blobs import deletions
from ftune.service.blobs.base import BlobMissing
from ftune.service.blobs.keys import export_prefix, log_key, model_key, model_prefix
from ftune.service.blobs.local import LocalBlobStore
from ftune.service.db.session import Database
from ftune.service.db.tables import Job, TunedModel
from ftune.service.errors import Conflict, NotFound, Vanished
from ftune.service.exports import ExportSlots
from ftune.service.ids import new_id
from ftune.service.jobs import delete_job
from ftune.service.logs import stored_log_lines
from ftune.service.predictor_cache import PredictorCache
from ftune.service.settings import Settings
from ftune.service.storage import Storage
from ftune.service.tuned_models import build_download, bundle_folder, delete_models

LOG_LINES = 3000  # per attempt: reading a job's log takes a moment, so deletes overlap it


@dataclass
class Registry:
    """Registers models the way a worker leaves them: bundle and log in the store, rows in
    the database, in team-a."""

    db: Database
    storage: Storage
    bundle: Path  # the tiny model's files, copied into each model registered
    tiny: dict  # the tiny model, as the API shows it
    tenant_id: str

    def model(self) -> TunedModel:
        model_id, job_id = new_id(), new_id()
        with tempfile.TemporaryDirectory(dir=self.storage.tmp) as scratch:
            folder = Path(scratch) / "bundle"
            shutil.copytree(self.bundle, folder)
            # A file of its own: each model's tar has its own hash, so no host has it cached.
            (folder / "registered.txt").write_text(model_id)
            stored = self.storage.put_tree(model_key(model_id), folder)
        for attempt in (1, 2):
            lines = (json.dumps({"message": f"attempt {attempt} line {i}", "job_id": job_id})
                     + "\n" for i in range(LOG_LINES))
            self.storage.blobs.put_chunks(log_key(job_id, attempt),
                                          (line.encode() for line in lines))
        with self.db.session() as session:
            session.add(Job(id=job_id, tenant_id=self.tenant_id,
                            dataset_id=self.tiny["dataset_id"], spec={}, epochs=1,
                            status="succeeded"))
            session.flush()
            model = TunedModel(id=model_id, tenant_id=self.tenant_id, job_id=job_id,
                               dataset_id=self.tiny["dataset_id"],
                               name=f"vanishing-{model_id[:8]}", version=1,
                               backbone=self.tiny["backbone"], classes=self.tiny["classes"],
                               metrics={}, blob_sha256=stored.sha256, size_bytes=stored.size,
                               spec=self.tiny["spec"])
            session.add(model)
            session.flush()
            session.expunge(model)
        return model

    def delete(self, model: TunedModel) -> None:
        """What DELETE /v1/models/{id} does: the rows, then the objects."""
        with self.db.session() as session:
            ids = delete_models(session, LOCAL_USER, ref=model.id, all_versions=False,
                                force=True)
        deletions.remove(self.db, self.storage.blobs, [model_prefix(ids[0]),
                                                       export_prefix(ids[0])])

    def left_in_store(self, model_id: str) -> list[str]:
        return [*self.storage.blobs.keys(model_prefix(model_id)),
                *self.storage.blobs.keys(export_prefix(model_id))]


@pytest.fixture(scope="module")
def registry(service_home, database_of_stack, tiny_model, tmp_path_factory
             ) -> Iterator[Registry]:
    db = Database(database_of_stack)
    # The stack's store, with a cache of this test process's own (the API keeps its own).
    storage = Storage(service_home, derived=DerivedStore(
        tmp_path_factory.mktemp("vanishing-cache"), 1 << 30))
    with db.session() as session:
        tenant_id = get_tenant(session, "team-a").id
        bundle = bundle_folder(storage, session.get(TunedModel, tiny_model["id"]))
    yield Registry(db, storage, bundle, tiny_model, tenant_id)
    db.dispose()


@pytest.fixture(scope="module")
def png(tiny_folder) -> bytes:
    out = io.BytesIO()
    Image.open(next((tiny_folder / "animal1").iterdir())).save(out, "PNG")
    return out.getvalue()


def _settings(registry: Registry) -> Settings:
    return Settings(home=registry.storage.home, database_url=str(registry.db.engine.url))


# -- Deleted between the row lookup and the read (the service functions the routes call) ----

def test_a_download_built_after_its_model_was_deleted_is_404_and_leaves_no_object(registry):
    model = registry.model()  # the row, as the route looked it up
    bundle_folder(registry.storage, model)  # its files on this host, as after a predict
    registry.delete(model)
    with pytest.raises(NotFound, match=f"model {model.id} was deleted while its "
                                       "safetensors download was built"):
        build_download(registry.db, registry.storage, _settings(registry), model=model,
                       fmt="safetensors", slots=ExportSlots(1))
    # Built from this host's copy and stored, then removed: nothing outlives the row.
    assert registry.left_in_store(model.id) == []


def test_a_model_whose_files_went_before_they_were_fetched_is_409_saying_so(registry):
    model = registry.model()
    registry.delete(model)
    with pytest.raises(Conflict, match="deleted while this request ran") as refused:
        PredictorCache(registry.storage, 1 << 30).get(model)
    assert refused.value.status_code == 409 and model.id in refused.value.detail
    with pytest.raises(Conflict, match="missing from the store"):
        build_download(registry.db, registry.storage, _settings(registry), model=model,
                       fmt="onnx", slots=ExportSlots(1))
    assert registry.left_in_store(model.id) == []


def test_an_object_deleted_as_it_is_opened_is_a_404_naming_it(registry):
    model = registry.model()
    stored = build_download(registry.db, registry.storage, _settings(registry), model=model,
                            fmt="safetensors", slots=ExportSlots(1))
    registry.delete(model)
    with pytest.raises(BlobMissing) as gone:
        next(registry.storage.blobs.read_chunks(stored.key))
    answer = Vanished.of_blob(gone.value)
    assert answer.status_code == 404
    assert answer.detail == (f"model {model.id}'s safetensors download is no longer in the "
                             "store: it was deleted while this request ran")


def test_a_job_deleted_while_its_log_is_read_is_a_404_naming_its_log(registry):
    model = registry.model()
    registry.delete(model)
    lines = stored_log_lines(registry.storage.blobs, model.job_id)
    assert "attempt 1 line 0" in next(lines)  # both attempts' objects are listed by now
    with registry.db.session() as session:
        doomed = delete_job(session, LOCAL_USER, job_id=model.job_id)
    deletions.remove(registry.db, registry.storage.blobs, doomed)
    with pytest.raises(BlobMissing) as gone:
        list(lines)  # the first attempt was open already; the second is gone
    assert Vanished.of_blob(gone.value).detail.startswith(f"job {model.job_id}'s log is no "
                                                          "longer in the store")


# -- The local store under concurrent deletes ----------------------------------------------

def _race(first: Callable[[], None], second: Callable[[], None], rounds: int) -> None:
    """Run both ``rounds`` times at once; re-raise what either raised."""
    errors: list[BaseException] = []

    def loop(step: Callable[[], None]) -> None:
        try:
            for _ in range(rounds):
                step()
        except BaseException as exc:  # re-raised below, in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(step,)) for step in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def test_the_local_store_writes_and_lists_while_a_delete_empties_the_folder(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    folder = f"exports/{new_id()}"
    counter = itertools.count()

    def write() -> None:  # another format of the model, as a download builds it
        store.put_chunks(f"{folder}/model.onnx", [b"x"])
        assert set(store.keys("exports/")) <= {f"{folder}/model.onnx", f"{folder}/model.zip"}

    def delete_and_list() -> None:  # the delete removes the folder it empties
        store.put_chunks(f"{folder}/model.zip", [b"z"])
        store.delete_prefix(f"{folder}/")
        assert set(store.keys(f"{folder}/")) <= {f"{folder}/model.onnx", f"{folder}/model.zip"}
        next(counter)

    _race(write, delete_and_list, rounds=300)
    assert next(counter) == 300


# -- Real requests racing a real delete ------------------------------------------------------

@dataclass
class Answers:
    seen: list[tuple[str, int, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    deleted: threading.Event = field(default_factory=threading.Event)
    after_delete: set[int] = field(default_factory=set)  # threads with an answer sent after it

    def add(self, what: str, response: httpx.Response, sent_after_delete: bool) -> None:
        detail = response.json().get("detail", "") if response.status_code >= 400 else ""
        with self.lock:
            self.seen.append((what, response.status_code, str(detail)))
            if sent_after_delete:
                self.after_delete.add(threading.get_ident())

    def statuses(self) -> set[int]:
        return {status for _, status, _ in self.seen}


def _hammer(api_url: str, headers: dict, requests: list[tuple[str, Callable]],
            answers: Answers, stop: threading.Event) -> None:
    with httpx.Client(base_url=api_url, headers=headers, timeout=60) as http:
        for what, send in itertools.cycle(requests):
            if stop.is_set():
                return
            after = answers.deleted.is_set()
            answers.add(what, send(http), after)


def _race_requests(api_url: str, headers: dict, requests: list[tuple[str, Callable]],
                   delete: Callable[[], None], threads: int = 3) -> Answers:
    """Requests from ``threads`` clients before, during and after ``delete``: until each
    client has had an answer to a request it sent once the delete was done."""
    answers, stop = Answers(), threading.Event()
    workers = [threading.Thread(target=_hammer, args=(api_url, headers, requests[i:] +
                                                      requests[:i], answers, stop))
               for i in range(threads)]
    for worker in workers:
        worker.start()
    try:
        wait_until(lambda: len(answers.seen) >= threads, 60, "the first answers")
        delete()
        answers.deleted.set()
        wait_until(lambda: len(answers.after_delete) == threads, 60,
                   "an answer to each client after the delete")
    finally:
        stop.set()
        for worker in workers:
            worker.join(120)
    return answers


def _assert_clear(answers: Answers, object_id: str) -> None:
    server_errors = [a for a in answers.seen if a[1] >= 500]
    assert not server_errors, server_errors[:5]
    assert answers.statuses() <= {200, 404, 409}, answers.statuses()
    for what, status, detail in answers.seen:
        if status in (404, 409):
            assert object_id in detail, (what, status, detail)


@pytest.mark.parametrize("built_before", [False, True], ids=["first-download", "kept-download"])
def test_downloads_and_predicts_of_a_model_being_deleted_are_never_5xx(
        api_url, client, registry, png, built_before):
    model = registry.model()
    if built_before:  # the zip is in the store and the bundle on the API host
        assert client.get(f"/v1/models/{model.id}/download").status_code == 200
    base = f"/v1/models/{model.id}"
    requests: list[tuple[str, Callable]] = [
        ("download", lambda h: h.get(f"{base}/download")),
        ("predict", lambda h: h.post(f"{base}/predict", files={"files": ("a.png", png)})),
        ("evaluation", lambda h: h.get(f"{base}/evaluation")),
        ("card", lambda h: h.get(f"{base}/card")),
        ("model", lambda h: h.get(base)),
    ]

    def delete() -> None:
        assert client.delete(base, params={"force": "true"}).status_code == 204

    answers = _race_requests(api_url, dict(client.headers), requests, delete)
    _assert_clear(answers, model.id)
    assert {200, 404} <= answers.statuses(), answers.statuses()  # it raced: before and after
    assert registry.left_in_store(model.id) == []  # no download stored for a deleted model


def test_logs_of_a_job_being_deleted_are_never_5xx(api_url, client, registry):
    model = registry.model()
    assert client.delete(f"/v1/models/{model.id}").status_code == 204  # its model goes first
    path = f"/v1/jobs/{model.job_id}/logs"
    requests: list[tuple[str, Callable]] = [("logs", lambda h: h.get(path, params={"tail": 5}))]

    def delete() -> None:
        assert client.delete(f"/v1/jobs/{model.job_id}").status_code == 204

    answers = _race_requests(api_url, dict(client.headers), requests, delete)
    _assert_clear(answers, model.job_id)
    assert {200, 404} <= answers.statuses(), answers.statuses()
