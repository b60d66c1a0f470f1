"""`ftune backup` and `ftune restore`: a backup of a running service comes back whole into a
new data directory (datasets, a finished job, a model with an alias, keys) and the job that
was running at backup time runs again there; a restore refuses a non-empty home and a backup
that is damaged, before it writes anything."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from sqlalchemy import select

from ftune.cli import main
from ftune.processes import Stack, wait_until
from ftune.service.auth.principal import Role
from ftune.service.blobs.base import BlobStore
from ftune.service.blobs.keys import dataset_key
from ftune.service.blobs.local import LocalBlobStore
from ftune.service.blobs.open import open_store
from ftune.service.db import migrate
from ftune.service.db.session import Database
from ftune.service.db.tables import DEFAULT_TENANT_ID, Dataset, Job, JobEvent, JobRun, utcnow
from ftune.testing.access import make_key
from ftune.testing.archives import zip_folder

WORKER = "backup-worker@localhost"
FAST = {"FTUNE_CANCEL_POLL_S": "0.2", "FTUNE_PROGRESS_INTERVAL_S": "0.2",
        "FTUNE_WORKER_HEARTBEAT_S": "1"}


# -- a small home written straight through the service's own tables and store -------------
def _small_home(home: Path, database_url: str, store: BlobStore | None = None
                ) -> dict[str, str]:
    """A dataset (its row and its images' blob, in ``store`` or the home's own folder) and a
    job that is running on a worker."""
    db = Database(database_url, prepare=migrate.upgrade)
    payload = b"the images of a dataset, as its tar would be"
    try:
        with db.session() as session:
            dataset = Dataset(tenant_id=DEFAULT_TENANT_ID, name="small", classes=["a", "b"],
                              class_counts={"train": {"a": 1, "b": 1}}, num_images=2,
                              splits={"train": 2, "val": None}, warnings=[],
                              blob_sha256=hashlib.sha256(payload).hexdigest())
            session.add(dataset)
            session.flush()
            job = Job(tenant_id=DEFAULT_TENANT_ID, dataset_id=dataset.id, status="running",
                      spec={"epochs": 3}, epochs=3, attempts=1, worker="gone@elsewhere",
                      heartbeat_at=utcnow(), started_at=utcnow())
            session.add(job)
            session.flush()
            session.add(JobRun(job_id=job.id, tenant_id=DEFAULT_TENANT_ID,
                               worker="gone@elsewhere"))
        store = store or LocalBlobStore(home / "blobs")
        store.put_chunks(dataset_key(dataset.id), [payload])
    finally:
        db.dispose()
    return {"dataset": dataset.id, "job": job.id}


@pytest.fixture
def small_backup(tmp_path, database_url, monkeypatch) -> Iterator[tuple[Path, dict, str]]:
    """A backup of a small home (SQLite, and PostgreSQL through pg_dump), and the URL of an
    empty database to restore it into (for SQLite: the new home's own)."""
    if database_url.startswith("sqlite"):
        made = _small_home(tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'ftune.db'}")
        assert main(["backup", str(tmp_path / "backup"), "--home", str(tmp_path / "home")]) == 0
        yield tmp_path / "backup", made, f"sqlite:///{tmp_path / 'restored' / 'ftune.db'}"
        return
    from ftune.testing.postgres import fresh_database

    monkeypatch.setenv("DATABASE_URL", database_url)
    made = _small_home(tmp_path / "home", database_url)
    assert main(["backup", str(tmp_path / "backup"), "--home", str(tmp_path / "home")]) == 0
    with fresh_database(_server_of(database_url)) as target:
        monkeypatch.setenv("DATABASE_URL", target)
        yield tmp_path / "backup", made, target


def _server_of(database_url: str) -> str:
    return database_url.rsplit("/", 1)[0] + "/postgres"


def test_a_backup_restores_into_an_empty_home_and_running_jobs_are_queued(
        small_backup, tmp_path, capsys):
    backup, made, target = small_backup
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["format"] == "ftune-backup" and manifest["version"] == 1
    assert manifest["database"]["schema_revision"] == migrate.head_revision()
    assert manifest["counts"]["datasets"] == 1 and manifest["counts"]["jobs"] == 1
    key = dataset_key(made["dataset"])
    if manifest["database"]["kind"] == "sqlite":
        assert (backup / "database.sqlite3").is_file()
    assert [b["key"] for b in manifest["blobs"]] == [key]
    assert oct((backup).stat().st_mode & 0o777) == "0o700"

    restored = tmp_path / "restored"
    assert main(["restore", str(backup), "--home", str(restored)]) == 0
    assert made["job"] in capsys.readouterr().out
    assert LocalBlobStore(restored / "blobs").read(key) == (tmp_path / "backup" / "blobs" /
                                                            key).read_bytes()
    db = Database(target)
    try:
        migrate.require_current(db.engine)
        with db.session() as session:
            job = session.get(Job, made["job"])
            assert job is not None and job.status == "queued" and job.worker is None
            assert session.scalar(select(JobRun.ended_at).where(JobRun.job_id == job.id))
            last = session.scalars(select(JobEvent).where(JobEvent.job_id == job.id)
                                   .order_by(JobEvent.id.desc())).first()
            assert last is not None and last.data["status"] == "queued"
            assert "restored from a backup" in last.data["reason"]
    finally:
        db.dispose()


def test_a_backup_of_an_older_schema_is_upgraded_on_restore(tmp_path, capsys):
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(migrate._config())
    previous = script.get_revision(migrate.head_revision()).down_revision
    assert isinstance(previous, str)
    home = str(tmp_path / "home")
    assert main(["db", "upgrade", previous, "--home", home]) == 0
    assert main(["backup", str(tmp_path / "backup"), "--home", home]) == 0
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    assert manifest["database"]["schema_revision"] == previous
    capsys.readouterr()
    assert main(["restore", str(tmp_path / "backup"), "--home", str(tmp_path / "new")]) == 0
    assert f"schema {previous} upgraded to {migrate.head_revision()}" in capsys.readouterr().out
    db = Database(f"sqlite:///{tmp_path / 'new' / 'ftune.db'}")
    try:
        migrate.require_current(db.engine)
    finally:
        db.dispose()


def _refused(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """What the command said on its way out: it must fail, with a message."""
    capsys.readouterr()
    assert main(args) != 0
    return capsys.readouterr().err


def _untouched(home: Path) -> bool:
    """Nothing written there (``ftune`` makes the data directory itself, empty, at start)."""
    return not home.exists() or not any(home.iterdir())


def test_restore_refuses_a_home_that_is_not_empty(small_backup, tmp_path, capsys):
    backup, _, _ = small_backup
    home = tmp_path / "restored"
    home.mkdir(exist_ok=True)
    (home / "notes.txt").write_text("mine")
    said = _refused(["restore", str(backup), "--home", str(home)], capsys)
    assert f"the data directory {home} is not empty (it holds notes.txt)" in said
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]  # nothing written


@pytest.mark.parametrize("damage", ["missing", "not json", "wrong format", "bad key"])
def test_restore_refuses_a_missing_or_corrupt_manifest(tmp_path, damage, capsys):
    made = _small_home(tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'ftune.db'}")
    assert main(["backup", str(tmp_path / "backup"), "--home", str(tmp_path / "home")]) == 0
    path = tmp_path / "backup" / "manifest.json"
    manifest = json.loads(path.read_text())
    if damage == "missing":
        path.unlink()
    elif damage == "not json":
        path.write_text(path.read_text()[:40])
    elif damage == "wrong format":
        path.write_text(json.dumps({**manifest, "version": 99}))
    else:  # a key that would lead a path out of the backup
        manifest["blobs"][0]["key"] = f"datasets/{made['dataset']}/../../../../etc/passwd"
        path.write_text(json.dumps(manifest))
    expected = {"missing": "manifest.json is missing", "not json": "is corrupt",
                "wrong format": "format version 99", "bad key": "not a storage key"}[damage]
    said = _refused(["restore", str(tmp_path / "backup"), "--home", str(tmp_path / "restored")],
                    capsys)
    assert "restore refused" in said and expected in said
    assert _untouched(tmp_path / "restored")


@pytest.mark.parametrize("tampered", ["blob", "database"])
def test_restore_refuses_a_tampered_backup_naming_the_bad_file(tmp_path, tampered, capsys):
    made = _small_home(tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'ftune.db'}")
    backup = tmp_path / "backup"
    assert main(["backup", str(backup), "--home", str(tmp_path / "home")]) == 0
    key = dataset_key(made["dataset"])
    victim = backup / "blobs" / key if tampered == "blob" else backup / "database.sqlite3"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    victim.write_bytes(bytes(data))
    name = f"the blob {key}" if tampered == "blob" else "the database copy database.sqlite3"
    said = _refused(["restore", str(backup), "--home", str(tmp_path / "restored")], capsys)
    assert f"{name} fails its checksum" in said
    assert _untouched(tmp_path / "restored")


def test_restore_refuses_a_blob_that_is_a_link_out_of_the_backup(tmp_path, capsys):
    """A crafted backup must not make a restore copy a file of the host into a tenant's
    dataset: the link has the host file's size and hash in the manifest, and is refused."""
    made = _small_home(tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'ftune.db'}")
    backup = tmp_path / "backup"
    assert main(["backup", str(backup), "--home", str(tmp_path / "home")]) == 0
    key = dataset_key(made["dataset"])
    victim = backup / "blobs" / key
    secret = tmp_path / "host-secret"
    secret.write_bytes(victim.read_bytes())  # same size and hash: only the link can tell
    victim.unlink()
    victim.symlink_to(secret)
    said = _refused(["restore", str(backup), "--home", str(tmp_path / "restored")], capsys)
    assert f"the blob {key} is not a regular file inside the backup" in said
    assert _untouched(tmp_path / "restored")


def test_backup_refuses_a_destination_that_holds_something(tmp_path, capsys):
    _small_home(tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'ftune.db'}")
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "old").write_text("x")
    said = _refused(["backup", str(tmp_path / "backup"), "--home", str(tmp_path / "home")],
                    capsys)
    assert "already exists and is not an empty folder" in said
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".backup")] == []


@pytest.mark.processes
def test_an_s3_store_is_listed_and_checked_not_copied(tmp_path, monkeypatch, capsys):
    from ftune.testing.s3 import S3Server

    with S3Server(log=tmp_path / "moto.log") as server:
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        location = f"s3://{server.bucket}/ftune"
        monkeypatch.setenv("FTUNE_STORAGE", location)
        home, backup = tmp_path / "home", tmp_path / "backup"
        made = _small_home(home, f"sqlite:///{home / 'ftune.db'}",
                           open_store(location, home))
        assert main(["backup", str(backup), "--home", str(home)]) == 0
        manifest = json.loads((backup / "manifest.json").read_text())
        key = dataset_key(made["dataset"])
        assert manifest["storage"] == {"mode": "listed", "location": location}
        [entry] = manifest["blobs"]
        assert entry["key"] == key and entry["etag"] and entry["size"] > 0
        assert not (backup / "blobs").exists()  # nothing copied

        assert main(["restore", str(backup), "--home", str(tmp_path / "restored")]) == 0
        assert not (tmp_path / "restored" / "blobs").exists()  # the bucket keeps them
        server.client().delete_object(Bucket=server.bucket, Key=f"ftune/{key}")
        said = _refused(["restore", str(backup), "--home", str(tmp_path / "again")], capsys)
        assert f"the object {key} is missing from {location}" in said
        assert _untouched(tmp_path / "again")


# -- a running service, backed up and restored ---------------------------------------------
def _stack(home: Path, env: dict[str, str]) -> Stack:
    stack = Stack(home, env={**FAST, **env}, log_dir=home.parent / f"{home.name}-logs")
    stack.start_redis()
    return stack


def _wait_status(client: httpx.Client, job_id: str, statuses: tuple[str, ...],
                 timeout_s: float = 240) -> dict:
    def reached() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_until(reached, timeout_s, f"job {job_id} to be {statuses}", interval_s=0.3)


def _fill(client: httpx.Client, tiny_folder: Path) -> dict:
    """A dataset, a finished job, its model under an alias, and a job running now."""
    dataset = client.post("/v1/datasets", data={"name": "tiny"}, params={"dedupe": "false"},
                          files={"file": ("tiny.zip", zip_folder(tiny_folder))}).json()
    spec = {"image_size": 32, "epochs": 1, "batch_size": 12, "preset": "fast"}
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": spec}).json()
    done = _wait_status(client, job["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done["error"]
    alias = client.put("/v1/models/aliases/production", json={"model": done["model_id"]})
    assert alias.status_code == 200, alias.text
    # Every layer trains (no cached features), so an epoch takes a while: it is running.
    slow = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": {
        **spec, "epochs": 3, "early_stopping": {"patience": 3},
        "freeze": {"strategy": "none"}}}).json()
    wait_until(lambda: _progress(client, slow["id"])["epochs_done"] >= 1, 180,
               "the slow job's first epoch (a checkpoint to resume from)")
    return {"dataset": dataset, "job": done, "slow": slow}


def _progress(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/v1/jobs/{job_id}").json()["progress"]


def _image(folder: Path) -> bytes:
    path = next(p for p in sorted(folder.rglob("*")) if p.is_file())
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.processes
def test_a_running_service_is_backed_up_and_restored_whole(tmp_path, tiny_folder):
    old_home, new_home, backup = tmp_path / "old", tmp_path / "new", tmp_path / "backup"
    # Its worker is killed mid-run (as a crash would) and no reconciler queues its job again
    # before the backup: the job is "running" in it, on a worker that will never come back.
    with _stack(old_home, {"FTUNE_JOB_STALE_S": "600"}) as old:
        key = make_key(f"sqlite:///{old_home / 'ftune.db'}", role=Role.ADMIN, tenant="team")
        worker = old.start_worker(WORKER)
        with key.client(old.start_api(), timeout=120) as client:
            made = _fill(client, tiny_folder)
            old.kill(worker)
            assert main(["backup", str(backup), "--home", str(old_home)]) == 0  # API up
            assert client.get(f"/v1/jobs/{made['slow']['id']}").json()["status"] == "running"
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["counts"]["models"] == 1 and manifest["counts"]["model_aliases"] == 1

    assert main(["restore", str(backup), "--home", str(new_home)]) == 0
    with _stack(new_home, {}) as new:
        new.start_worker(WORKER)
        with key.client(new.start_api(), timeout=120) as client:  # the same key works
            _check_restored(client, made, tiny_folder)


def _check_restored(client: httpx.Client, made: dict, tiny_folder: Path) -> None:
    datasets = client.get("/v1/datasets").json()["items"]
    assert [d["id"] for d in datasets] == [made["dataset"]["id"]]
    model_id = made["job"]["model_id"]
    assert client.get("/v1/models/tiny:production").json()["id"] == model_id
    download = client.get(f"/v1/models/{model_id}/download")
    assert download.status_code == 200 and len(download.content) > 1000
    predicted = client.post("/v1/models/tiny:production/predict",
                            files={"files": ("x.png", _image(tiny_folder), "image/png")})
    assert predicted.status_code == 200, predicted.text
    assert client.get(f"/v1/jobs/{made['job']['id']}").json()["status"] == "succeeded"
    # The job that was running at backup time was queued again, and runs to its end here.
    slow = _wait_status(client, made["slow"]["id"], ("succeeded", "failed", "cancelled"))
    assert slow["status"] == "succeeded", slow["error"]
    assert slow["attempts"] == 2  # its run in the old home, and this one
