"""The storage interface on both backends: a folder, and a real S3-compatible server
(moto_server over HTTP, reached through the standard AWS variables)."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ftune.models.derived.store import DerivedStore
from ftune.service.blobs import BlobError, BlobStore, check_key, deletions, open_store
from ftune.service.blobs.backfill import store_legacy_files
from ftune.service.blobs.base import BlobMissing, is_store_outage
from ftune.service.blobs.fetched import CorruptBlob, fetch_tree
from ftune.service.blobs.keys import dataset_key
from ftune.service.blobs.local import LocalBlobStore
from ftune.service.blobs.s3 import S3BlobStore, s3_client
from ftune.service.blobs.tarred import tar_chunks
from ftune.service.db import migrate
from ftune.service.db.session import Database
from ftune.service.db.tables import DEFAULT_TENANT_ID, BlobDeletion, Dataset
from ftune.service.storage import Storage
from ftune.testing.s3 import S3Server

pytestmark = pytest.mark.processes
MIB = 1 << 20


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    with S3Server(log=tmp_path_factory.mktemp("moto") / "moto.log") as server:
        saved = {name: os.environ.get(name) for name in server.env}
        os.environ.update(server.env)
        yield server
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    server = request.getfixturevalue("s3_server")
    # 5 MiB parts (S3's smallest) so that a few MiB make a real multipart upload.
    return S3BlobStore(server.bucket, f"t-{tmp_path.name.lower()}", part_size=5 * MIB)


def _chunks(total: int, size: int = MIB, fail_after: int | None = None) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        if fail_after is not None and sent >= fail_after:
            raise ConnectionResetError("the client went away")
        piece = bytes([sent // size % 251]) * min(size, total - sent)
        sent += len(piece)
        yield piece


def _incomplete_uploads(store: BlobStore) -> list:
    if isinstance(store, S3BlobStore):
        listing = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
        return listing.get("Uploads", [])
    root = store.root  # type: ignore[attr-defined]
    return [p for p in root.rglob("*") if p.is_file() and p.name.endswith(".partial")]


def test_a_large_object_streams_in_parts_and_reads_back(store):
    info = store.put_chunks("datasets/" + "a" * 32 + "/images.tar", _chunks(11 * MIB))
    assert info.size == 11 * MIB
    data = b"".join(store.read_chunks(info.key, chunk_size=MIB))
    assert data == b"".join(_chunks(11 * MIB))
    assert store.info(info.key).size == 11 * MIB
    assert _incomplete_uploads(store) == []


def test_a_failed_upload_leaves_no_object_and_no_incomplete_upload(store):
    key = "uploads/" + "b" * 32
    with pytest.raises(ConnectionResetError):
        store.put_chunks(key, _chunks(12 * MIB, fail_after=7 * MIB))
    assert store.info(key) is None
    assert list(store.keys("uploads")) == []
    assert _incomplete_uploads(store) == []


def test_an_object_is_replaced_whole(store):
    key = "models/" + "c" * 32 + "/model.zip"
    store.put_chunks(key, [b"first version"])
    with pytest.raises(ConnectionResetError):
        store.put_chunks(key, _chunks(6 * MIB, fail_after=MIB))
    assert store.read(key) == b"first version"  # the failed write changed nothing


def test_keys_delete_and_prefixes(store, tmp_path):
    job = "jobs/" + "d" * 32
    for name in ("checkpoints/epoch-1.pt", "checkpoints/epoch-2.pt", "log.jsonl"):
        store.put_chunks(f"{job}/{name}", [name.encode()])
    store.put_chunks("jobs/" + "d" * 31 + "e/log.jsonl", [b"another job"])
    assert sorted(store.keys(f"{job}/checkpoints")) == [
        f"{job}/checkpoints/epoch-1.pt", f"{job}/checkpoints/epoch-2.pt"]
    assert store.delete_prefix(job) == 3
    assert list(store.keys(job)) == []
    assert store.read("jobs/" + "d" * 31 + "e/log.jsonl") == b"another job"
    store.delete(f"{job}/log.jsonl")  # already gone: nothing happens
    with pytest.raises(BlobMissing):
        b"".join(store.read_chunks(f"{job}/log.jsonl"))
    target = tmp_path / "copy.jsonl"
    assert store.download("jobs/" + "d" * 31 + "e/log.jsonl", target) == 11
    assert target.read_bytes() == b"another job"


def test_the_probe_of_a_working_store_passes(store):
    store.check()
    assert store.info("probes/storage-check") is None


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "Flowers/rose.jpg", "a b", "a//b",
                                 "jobs/../x", "", "x" * 600, "ümlaut"])
def test_keys_the_service_never_makes_are_refused(key, tmp_path):
    with pytest.raises(ValueError, match="not a storage key"):
        check_key(key)
    with pytest.raises(ValueError):
        LocalBlobStore(tmp_path).put_chunks(key, [b"x"])
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_store_fails_its_check_naming_it(monkeypatch):
    from ftune.processes import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    store = S3BlobStore("nowhere", "p", client=s3_client(attempts=1, timeout_s=2))
    with pytest.raises(BlobError, match="s3://nowhere/p"):
        store.check()


def test_the_storage_setting_chooses_the_backend(tmp_path, s3_server):
    assert isinstance(open_store(None, tmp_path), LocalBlobStore)
    assert open_store("", tmp_path).root == tmp_path / "blobs"  # type: ignore[attr-defined]
    assert open_store(f"file://{tmp_path}/elsewhere", tmp_path).root == Path(
        f"{tmp_path}/elsewhere")  # type: ignore[attr-defined]
    s3 = open_store(f"s3://{s3_server.bucket}/team/blobs", tmp_path)
    assert isinstance(s3, S3BlobStore) and (s3.bucket, s3.prefix) == (s3_server.bucket,
                                                                        "team/blobs")
    s3.check()
    for bad in ("s3://", "gs://bucket", "ftp://x/y", "bucket/prefix"):
        with pytest.raises(ValueError, match="FTUNE_STORAGE"):
            open_store(bad, tmp_path)


def test_storage_check_and_healthz_follow_the_configured_store(tmp_path, s3_server):
    import subprocess

    from fastapi.testclient import TestClient

    from ftune.processes import ftune_command
    from ftune.service.app import create_app
    from ftune.service.settings import Settings

    env = {**os.environ, **s3_server.env, "FTUNE_STORAGE": f"s3://{s3_server.bucket}/cli"}
    done = subprocess.run(ftune_command("storage", "check", "--home", str(tmp_path)),
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"storage ok: s3://{s3_server.bucket}/cli" in done.stdout
    env["FTUNE_STORAGE"] = "s3://no-such-bucket/cli"
    done = subprocess.run(ftune_command("storage", "check", "--home", str(tmp_path)),
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "storage unusable: s3://no-such-bucket/cli" in done.stderr
    env["FTUNE_STORAGE"] = "gs://elsewhere"
    done = subprocess.run(ftune_command("storage", "check", "--home", str(tmp_path)),
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "FTUNE_STORAGE must be" in done.stderr

    settings = Settings(home=tmp_path / "api", auth="off", redis_url="redis://127.0.0.1:1/0",
                        storage=f"s3://{s3_server.bucket}/api")
    create_app(settings).state.ctx.db.dispose()  # the API makes the schema; serve needs it
    for storage, reported in ((f"s3://{s3_server.bucket}/api", "ok"),
                              ("s3://no-such-bucket/api", "down: NoSuchBucket")):
        app = create_app(settings.model_copy(update={"storage": storage}), serve_only=True)
        try:
            with TestClient(app, base_url="http://127.0.0.1") as client:
                response = client.get("/healthz")
        finally:
            app.state.ctx.db.dispose()
        body = response.json()
        # Reported, not the status: with the store down the API still serves the models it
        # has cached, and its upkeep retries what failed.
        assert response.status_code == 200
        assert (body["storage"], body["storage_location"]) == (reported, storage)


class CountingStore:
    """The real store, counting the downloads that go through it."""

    def __init__(self, store: BlobStore) -> None:
        self.store, self.reads = store, 0
        self.location = store.location

    def read_chunks(self, key: str, chunk_size: int = 1 << 20):
        self.reads += 1
        return self.store.read_chunks(key, chunk_size)


def test_a_host_fetches_an_object_once_verified_and_within_its_cap(store, tmp_path):
    from ftune.models.derived.store import DerivedStore
    from ftune.service.blobs.fetched import CorruptBlob, fetch_verified

    first = store.put_chunks("datasets/" + "f" * 32 + "/images.tar", _chunks(3 * MIB))
    second = store.put_chunks("datasets/" + "e" * 32 + "/images.tar", _chunks(2 * MIB + 1))
    counting = CountingStore(store)
    cache = DerivedStore(tmp_path / "cache", max_bytes=4 * MIB, min_idle_s=0)
    path, downloaded = fetch_verified(counting, cache, first.key, first.sha256, owner="t1")
    assert downloaded and path.read_bytes() == b"".join(_chunks(3 * MIB))
    again, downloaded = fetch_verified(counting, cache, first.key, first.sha256, owner="t1")
    assert (again, downloaded, counting.reads) == (path, False, 1)  # the second job: nothing

    # An object whose bytes do not match the recorded hash is never kept.
    with pytest.raises(CorruptBlob, match="content hash"):
        fetch_verified(counting, cache, second.key, first.sha256.replace(
            first.sha256[0], "0" if first.sha256[0] != "0" else "1"), owner="t1")
    assert [e.key for e in cache.entries()] == [first.sha256]

    # Over the cap, the least recently used copy goes.
    fetch_verified(counting, cache, second.key, second.sha256, owner="t2")
    assert [e.key for e in cache.entries()] == [second.sha256]
    with pytest.raises(ValueError, match="SHA-256"):
        fetch_verified(counting, cache, first.key, "../../etc")


def test_the_health_of_the_store_is_asked_at_most_once_per_interval(tmp_path):
    from ftune.service.blobs.base import StoreHealth

    class Counted(LocalBlobStore):
        asked = 0

        def reachable(self) -> str:
            Counted.asked += 1
            return super().reachable()

    health = StoreHealth(Counted(tmp_path / "blobs"), ttl_s=60)
    assert [health.status() for _ in range(5)] == ["ok"] * 5
    assert Counted.asked == 1
    health.ttl_s = 0
    health.status()
    assert Counted.asked == 2


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_folder_is_stored_as_one_tar_the_same_each_time(store, tmp_path):
    folder = tmp_path / "images"
    for name, data in {"a/1.png": b"one", "a/2.png": os.urandom(3 * MIB), "b/x.jpg": b""}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    first = store.put_chunks("datasets/first/images.tar", tar_chunks(folder))
    again = store.put_chunks("datasets/again/images.tar", tar_chunks(folder))
    assert first.sha256 == again.sha256 and first.size == again.size > 3 * MIB
    cache = DerivedStore(tmp_path / "cache", 64 * MIB)
    unpacked, downloaded = fetch_tree(store, cache, first.key, str(first.sha256))
    assert downloaded and _tree(unpacked) == _tree(folder)
    # A second job on this host finds it here: nothing is downloaded again.
    store.delete(first.key)
    assert fetch_tree(store, cache, first.key, str(first.sha256)) == (unpacked, False)
    # Bytes that do not match the recorded hash are never used.
    with pytest.raises(CorruptBlob):
        fetch_tree(store, cache, again.key, "0" * 64)
    assert [e.key for e in cache.entries()] == [first.sha256]


def test_a_tar_stream_abandoned_midway_stops_its_writer(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    for k in range(8):
        (folder / f"{k}.bin").write_bytes(os.urandom(MIB))
    chunks = tar_chunks(folder)
    next(chunks)
    chunks.close()  # the consumer gave up (an upload failed): no thread is left blocked
    assert not [t for t in threading.enumerate() if t.name == "tar-writer"]


def test_a_delete_the_store_refuses_is_kept_and_retried(tmp_path, s3_server):
    db = Database(f"sqlite:///{tmp_path / 'ftune.db'}", prepare=migrate.upgrade)
    live = S3BlobStore(s3_server.bucket, "del", client=s3_client(attempts=1, timeout_s=5))
    live.put_chunks("models/gone/bundle.tar", [b"x"])
    with db.session() as session:
        scheduled = deletions.schedule(session, ["models/gone/"])
    dead = S3BlobStore(s3_server.bucket, "del", client=_dead_client())
    assert deletions.remove(db, dead, scheduled) == 0  # the store is down: nothing lost
    with db.session() as session:
        pending = session.get(BlobDeletion, "models/gone/")
        assert pending is not None and pending.attempts == 1
        assert "EndpointConnectionError" in (pending.last_error or "")
    assert list(live.keys("models/gone/")) == ["models/gone/bundle.tar"]
    assert deletions.remove(db, live) == 1  # the upkeep's retry: every pending prefix
    assert list(live.keys("models/gone/")) == []
    with db.session() as session:
        assert session.get(BlobDeletion, "models/gone/") is None
    db.dispose()


def test_a_database_gone_just_after_a_delete_committed_does_not_fail_that_delete(tmp_path):
    """The removal after a committed delete: the database restarting then is logged, not
    raised (the request answers the delete, which was done; the upkeep removes the objects
    later), while the upkeep's own removal still reports the outage to its caller."""
    from sqlalchemy.exc import OperationalError

    store = LocalBlobStore(tmp_path / "blobs")
    store.put_chunks("models/gone/bundle.tar", [b"x"])
    down = Database("postgresql+psycopg://ftune@127.0.0.1:1/ftune")  # nothing listens there
    assert deletions.remove_committed(down, store, ["models/gone/"]) == 0
    with pytest.raises(OperationalError):
        deletions.remove(down, store, ["models/gone/"])
    assert list(store.keys("models/")) == ["models/gone/bundle.tar"]  # nothing lost
    down.dispose()


def test_a_writer_s_hold_removes_what_it_stored_only_if_it_never_recorded_it(tmp_path):
    """A writer holds a prefix before storing under it: killed before its row commits, the
    objects go once the hold is due; a writer that recorded its row keeps them; a writer
    whose hold the upkeep claimed first cannot record (HoldLost), so no row points at
    objects being removed."""
    db = Database(f"sqlite:///{tmp_path / 'ftune.db'}", prepare=migrate.upgrade)
    store = LocalBlobStore(tmp_path / "blobs")
    for name in ("died", "kept", "late"):
        with db.session() as session:
            deletions.hold(session, [f"models/{name}/"], hold_s=0 if name != "kept" else 60)
        store.put_chunks(f"models/{name}/bundle.tar", [b"x"])
    with db.session() as session:  # the row's transaction takes "kept"'s hold back
        deletions.release(session, ["models/kept/"])
    assert deletions.remove(db, store, ["models/died/"]) == 0  # a hold is no deletion yet
    assert deletions.remove(db, store) == 2  # the upkeep: "died" and "late" came due
    assert list(store.keys("models/")) == ["models/kept/bundle.tar"]
    with pytest.raises(deletions.HoldLost), db.session() as session:
        deletions.release(session, ["models/late/"])
    with db.session() as session:
        assert session.query(BlobDeletion).count() == 0
    db.dispose()


def test_a_store_that_does_not_answer_is_an_outage_a_missing_key_is_not(s3_server):
    with pytest.raises(Exception) as down:
        S3BlobStore("b", "p", client=_dead_client()).info("x")
    assert is_store_outage(down.value)
    assert not is_store_outage(BlobMissing("x")) and not is_store_outage(ValueError("x"))


def test_files_from_before_the_blob_store_are_stored_at_start(tmp_path, tiny_folder):
    home = tmp_path / "home"
    storage = Storage(home)
    storage.prepare()
    db = Database(f"sqlite:///{home / 'ftune.db'}", prepare=migrate.upgrade)
    shutil.copytree(tiny_folder, home / "datasets" / ("a" * 32))
    with db.session() as session:
        session.add(Dataset(id="a" * 32, tenant_id=DEFAULT_TENANT_ID, name="old", classes=[],
                            class_counts={}, num_images=36, splits={}, warnings=[]))
        session.add(Dataset(id="b" * 32, tenant_id=DEFAULT_TENANT_ID, name="lost", classes=[],
                            class_counts={}, num_images=1, splits={}, warnings=[]))
    assert store_legacy_files(db, storage) == 1
    with db.session() as session:
        old, lost = session.get(Dataset, "a" * 32), session.get(Dataset, "b" * 32)
        assert old is not None and old.blob_sha256 and lost is not None
        assert lost.blob_sha256 is None  # no folder: nothing to store
        sha = old.blob_sha256
    assert not (home / "datasets" / ("a" * 32)).exists()
    assert _tree(storage.local_tree(dataset_key("a" * 32), sha)) == _tree(tiny_folder)
    assert store_legacy_files(db, storage) == 0  # once
    db.dispose()


def _dead_client():
    import boto3
    from botocore.config import Config

    from ftune.processes import free_port

    return boto3.session.Session().client(
        "s3", endpoint_url=f"http://127.0.0.1:{free_port()}", region_name="us-east-1",
        aws_access_key_id="x", aws_secret_access_key="y",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2))


def test_downloads_stream_from_the_store_or_redirect_to_it_when_presigned(tmp_path, s3_server,
                                                                         tiny_folder):
    import httpx
    from fastapi.testclient import TestClient

    from ftune.models.training.fit import fit
    from ftune.service.app import create_app
    from ftune.service.db.tables import Job, TunedModel
    from ftune.service.settings import Settings
    from ftune.testing.models import store_bundle

    settings = Settings(home=tmp_path / "api", auth="off", redis_url="redis://127.0.0.1:1/0",
                        storage=f"s3://{s3_server.bucket}/dl")
    app = create_app(settings)  # makes the schema
    storage, db = app.state.ctx.storage, app.state.ctx.db
    stored = store_bundle(storage, fit(tiny_folder, {"image_size": 32, "epochs": 1}), "c" * 32)
    with db.session() as session:
        session.add(Job(id="d" * 32, tenant_id=DEFAULT_TENANT_ID, dataset_id="e" * 32, spec={},
                        epochs=1, status="succeeded"))
        session.flush()
        session.add(TunedModel(id="c" * 32, tenant_id=DEFAULT_TENANT_ID, job_id="d" * 32,
                               dataset_id="e" * 32, name="m", backbone="x", classes=[],
                               metrics={}, spec={}, blob_sha256=stored.sha256))
    db.dispose()
    for presigned in (False, True):
        app = create_app(settings.model_copy(update={"presigned_downloads": presigned}),
                         serve_only=True)
        try:
            with TestClient(app, base_url="http://127.0.0.1") as client:
                response = client.get(f"/v1/models/{'c' * 32}/download",
                                      follow_redirects=False)
        finally:
            app.state.ctx.db.dispose()
        if presigned:
            assert response.status_code == 307
            location = response.headers["location"]
            assert location.startswith(s3_server.endpoint) and "Signature" in location
            body = httpx.get(location, timeout=30)  # no credentials: the URL is the key
            assert body.status_code == 200
            assert f"model-{'c' * 32}.zip" in body.headers["content-disposition"]
        else:
            assert response.status_code == 200
            body = response
        assert body.content[:2] == b"PK"
        assert int(body.headers["content-length"]) == len(body.content)
