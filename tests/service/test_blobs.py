"""The storage interface on both backends: a folder, and a real S3-compatible server
(moto_server over HTTP, reached through the standard AWS variables)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ftune.service.blobs import BlobError, BlobStore, check_key, open_store
from ftune.service.blobs.base import BlobMissing
from ftune.service.blobs.local import LocalBlobStore
from ftune.service.blobs.s3 import S3BlobStore, s3_client
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
        # Reported, not yet part of the status: the service keeps no blobs there yet.
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
