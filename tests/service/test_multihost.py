"""The service on hosts that share nothing but the network (ftune/testing/cluster.py): the API,
PostgreSQL, Redis and an S3-compatible store on "control", one worker on each of "w1" and
"w2", every blob in the store. Jobs, sweeps, downloads and predictions work end to end, and
the faults of a network (a host cut off, the store down, Redis and PostgreSQL restarted)
lose nothing and duplicate nothing.

These need root (network and mount namespaces): where they cannot run they fail with
HostsUnavailable's message, never skip. Jobs are tiny (head-only or 32-pixel images) so the
module takes a few minutes."""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from ftune.processes import wait_until
from ftune.testing.archives import zip_folder
from ftune.testing.cluster import API_HOME, BUCKET, WORKER_HOME, Cluster
from ftune.testing.hosts import NetemUnavailable
from ftune.testing.sse import read_events
from tests.service.conftest import wait_for_job

pytestmark = pytest.mark.processes

# Head-only on cached features: seconds a job.
HEAD = {"image_size": 32, "batch_size": 12, "preset": "fast", "epochs": 3, "seed": 3,
        "early_stopping": {"patience": 100}}
# Every layer trains: a couple of seconds an epoch, long enough to be caught mid-run.
SLOW = {"image_size": 48, "batch_size": 6, "epochs": 6, "freeze": {"strategy": "none"},
        "early_stopping": {"patience": 100}, "seed": 5}
LONG = {**SLOW, "epochs": 30}  # still running while a second worker starts up


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def http(cluster) -> Iterator[httpx.Client]:
    with cluster.client() as client:
        yield client


@pytest.fixture(scope="module")
def dataset(http, tiny_folder) -> dict:
    response = http.post("/v1/datasets", files={"file": ("t.zip", zip_folder(tiny_folder))})
    assert response.status_code == 201, response.text
    return response.json()


def _workers_of(http: httpx.Client, job_id: str) -> list[str]:
    """The worker of each run of the job, in order (from its status events)."""
    events = read_events(http, f"/v1/jobs/{job_id}/events")
    return [e["data"]["worker"] for e in events
            if e["event"] == "status" and e["data"].get("status") == "running"]


def _host(worker: str) -> str:
    return worker.split("@", 1)[0]  # node names are HOST@HOST, see Cluster.start_worker


def _png(folder: Path) -> bytes:
    out = io.BytesIO()
    Image.open(next(next(folder.iterdir()).iterdir())).convert("RGB").save(out, "PNG")
    return out.getvalue()


def _models_consistent(cluster: Cluster, http: httpx.Client) -> set[str]:
    """Every model row has its bundle in the store and every bundle has its row."""
    rows = {m["id"] for m in http.get("/v1/models", params={"limit": 200}).json()["items"]}
    stored = {key.split("/")[1] for key in cluster.stored_keys("models/")}
    assert stored == rows
    return rows


def test_hosts_see_only_their_own_files(cluster):
    assert cluster.host_path("control", API_HOME).is_dir()  # the API's data directory...
    for worker in cluster.workers:  # ...is nowhere on a worker host, even by accident
        seen = cluster.hosts.run(worker, ["sh", "-c", f"ls -d {API_HOME} || echo absent"])
        assert seen.stdout.strip() == "absent"
        assert cluster.hosts.run(worker, ["ls", WORKER_HOME]).returncode == 0
    # The API's files hold no blob: those live in the store.
    assert not (cluster.host_path("control", API_HOME) / "blobs").exists()


def test_a_job_downloads_and_predictions_work_across_hosts(cluster, http, dataset, tiny_folder,
                                                           client, tiny_dataset):
    assert f"datasets/{dataset['id']}/images.tar" in cluster.stored_keys("datasets/")
    job = http.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": HEAD}).json()
    done = wait_for_job(http, job["id"], timeout_s=240)
    assert done["status"] == "succeeded", done["error"]
    assert _host(_workers_of(http, job["id"])[0]) in cluster.workers
    model_id = done["model_id"]
    assert f"models/{model_id}/bundle.tar" in cluster.stored_keys("models/")
    assert cluster.stored_keys(f"jobs/{job['id']}/checkpoints/") == []  # gone once it ended
    assert cluster.stored_keys(f"jobs/{job['id']}/logs/")  # the log stays
    assert any("started on" in line["message"]
               for line in http.get(f"/v1/jobs/{job['id']}/logs").json()["lines"])

    # The same job on one host with the local store (the session's stack): the same model.
    local = client.post("/v1/jobs", json={"dataset_id": tiny_dataset["id"], "spec": HEAD}).json()
    local = wait_for_job(client, local["id"], timeout_s=240)
    assert local["status"] == "succeeded", local["error"]
    for here, there in zip(local["metrics"], done["metrics"], strict=True):
        assert here["val_loss"] == pytest.approx(there["val_loss"], rel=1e-4)
        assert here["val_accuracy"] == there["val_accuracy"]

    download = http.get(f"/v1/models/{model_id}/download")
    assert download.status_code == 200
    assert int(download.headers["content-length"]) == len(download.content) > 1000
    assert download.content[:2] == b"PK"  # a zip, streamed from the store
    assert any(k.startswith(f"exports/{model_id}/") for k in cluster.stored_keys("exports/"))
    predicted = http.post(f"/v1/models/{model_id}/predict",
                          files=[("files", ("a.png", _png(tiny_folder), "image/png"))])
    assert predicted.status_code == 200, predicted.text
    assert predicted.json()["predictions"][0][0]["label"] in dataset["classes"]

    deleted = http.delete(f"/v1/models/{model_id}")
    assert deleted.status_code == 204
    assert not [k for k in cluster.stored_keys() if model_id in k]
    _models_consistent(cluster, http)


def test_a_sweep_runs_trials_on_both_hosts_and_each_host_fetches_the_data_once(cluster, http,
                                                                                 dataset):
    sweep = http.post("/v1/sweeps", json={
        "dataset_id": dataset["id"], "base": HEAD, "space": {"seed": {"int": [0, 100]}},
        "n_trials": 4, "parallelism": 2, "pruner": "none", "sampler": "random", "seed": 1})
    assert sweep.status_code == 202, sweep.text
    done = wait_until(lambda: (s := http.get(f"/v1/sweeps/{sweep.json()['id']}").json())
                      ["status"] != "running" and s, 300, "the sweep to end", interval_s=1)
    assert done["status"] == "succeeded", done["reason"]
    hosts = [_host(w) for t in done["trials"] for w in _workers_of(http, t["job_id"])]
    assert set(hosts) == set(cluster.workers), hosts
    # The dataset's tar was fetched at most once per host, however many trials ran there.
    for worker in cluster.workers:
        fetched = cluster.log(worker).count(f"fetched datasets/{dataset['id']}/images.tar")
        assert fetched <= 1, (worker, fetched)
    cached = [cluster.host_path(w, WORKER_HOME) / "cache" / "unpacked" for w in cluster.workers]
    assert sum(len(list(folder.iterdir())) for folder in cached if folder.exists()) >= 2

    # A model whose bundle vanished from the store (lost by the store, not deleted by us) is
    # a clear 409 wherever its files are needed, never a 500; deleting it still works.
    lost = next(t for t in done["trials"] if t["status"] == "succeeded")
    model_id = http.get(f"/v1/jobs/{lost['job_id']}").json()["model_id"]
    cluster.s3_client().delete_object(Bucket=BUCKET, Key=f"store/models/{model_id}/bundle.tar")
    for path in ("evaluation", "download"):
        response = http.get(f"/v1/models/{model_id}/{path}")
        assert response.status_code == 409, response.text
        assert "missing from the store" in response.json()["detail"]
    assert http.delete(f"/v1/models/{model_id}").status_code == 204
    _models_consistent(cluster, http)


def test_a_worker_host_cut_off_mid_job_is_replaced_and_its_stale_attempt_writes_nothing(
        cluster, http, dataset):
    cluster.stop_worker("w2")  # the job must start on w1
    job = http.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": LONG}).json()
    wait_until(lambda: http.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", 120,
               "the job to start on w1")
    cluster.start_worker("w2")  # claimed already: w2 cannot take it while w1 runs it
    wait_until(lambda: len(http.get(f"/v1/jobs/{job['id']}").json()["metrics"]) >= 2, 240,
               "two finished epochs on w1")
    assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    cluster.hosts.cut("w1")  # the cable pulled: w1 goes on training, alone
    cut_at = time.monotonic()
    try:
        wait_until(lambda: http.get(f"/v1/jobs/{job['id']}").json()["attempts"] >= 2, 120,
                   "the job to be taken over")
        taken_over_s = time.monotonic() - cut_at
        done = wait_for_job(http, job["id"], timeout_s=300)
    finally:
        cluster.hosts.restore("w1")
    assert done["status"] == "succeeded", done["error"]
    assert [_host(w) for w in _workers_of(http, job["id"])] == ["w1", "w2"]
    assert taken_over_s < 60  # the lease (6 s) and the reconciler's round, not minutes
    # Back on the network, the stale attempt finds the job gone from it: it writes nothing.
    wait_until(lambda: "taken over by another worker" in cluster.log("w1"), 120,
               "w1's stale attempt to stop")
    rows = http.get(f"/v1/jobs/{job['id']}").json()
    assert [m["epoch"] for m in rows["metrics"]] == list(range(1, 31))  # each epoch once
    assert rows["attempts"] == 2 and rows["model_id"] == done["model_id"]
    time.sleep(3)  # anything the stale attempt still had in flight
    models = _models_consistent(cluster, http)
    assert done["model_id"] in models
    assert len([m for m in http.get("/v1/models", params={"limit": 200}).json()["items"]
                if m["job_id"] == job["id"]]) == 1
    assert cluster.stored_keys(f"jobs/{job['id']}/checkpoints/") == []


def test_the_store_down_mid_job_is_waited_out(cluster, http, dataset, tiny_folder):
    job = http.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": SLOW}).json()
    wait_until(lambda: http.get(f"/v1/jobs/{job['id']}").json()["metrics"], 240,
               "the first epoch")
    datasets_before = http.get("/v1/datasets").json()["items"]
    objects_before = cluster.stored_keys("datasets/")
    cluster.stop_store()
    try:
        wait_until(lambda: http.get("/healthz").json()["storage"].startswith("down"), 20,
                   "/healthz to see the store down")
        upload = http.post("/v1/datasets", params={"dedupe": "false"},
                           files={"file": ("t.zip", zip_folder(tiny_folder))})
        assert upload.status_code == 503, upload.text  # refused clearly, never a 500
        assert "blob store is unavailable" in upload.json()["detail"]
        time.sleep(5)
    finally:
        cluster.start_store()
    assert http.get("/v1/datasets").json()["items"] == datasets_before  # nothing half-made
    assert cluster.stored_keys("datasets/") == objects_before
    # Nor parts of it (a checkpoint cut off mid-upload may leave some: the store refused
    # the abort too; the bucket's lifecycle rule for incomplete uploads takes those).
    assert cluster.s3_client().list_multipart_uploads(
        Bucket=BUCKET, Prefix="store/datasets/").get("Uploads", []) == []
    done = wait_for_job(http, job["id"], timeout_s=300)
    assert done["status"] == "succeeded", done["error"]
    assert [m["epoch"] for m in done["metrics"]] == list(range(1, 7))
    _models_consistent(cluster, http)


def test_redis_and_postgres_restarted_mid_job_lose_and_duplicate_nothing(cluster, http,
                                                                         dataset):
    job = http.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": SLOW}).json()
    wait_until(lambda: http.get(f"/v1/jobs/{job['id']}").json()["metrics"], 240,
               "the first epoch")
    cluster.restart_redis()
    wait_until(lambda: len(http.get(f"/v1/jobs/{job['id']}").json()["metrics"]) >= 3, 240,
               "two more epochs after Redis came back")
    cluster.restart_postgres()
    done = wait_for_job(http, job["id"], timeout_s=300)
    assert done["status"] == "succeeded", done["error"]
    assert [m["epoch"] for m in done["metrics"]] == list(range(1, 7))
    assert len([m for m in http.get("/v1/models", params={"limit": 200}).json()["items"]
                if m["job_id"] == job["id"]]) == 1
    _models_consistent(cluster, http)


def test_a_slow_link_to_a_worker_host_slows_it_but_breaks_nothing(cluster, http, dataset):
    """100 ms each way on w1's link: with netem (and 1% loss) where the kernel has it, else
    with forwarders that hold every byte that long (latency, no loss)."""
    cluster.stop_worker("w2")
    cluster.stop_worker("w1")
    netem = True
    try:
        try:
            cluster.hosts.slow("w1", delay_ms=100, loss_pct=1)
            redis_url = cluster.service_env["REDIS_URL"]
        except NetemUnavailable:
            netem = False
        cluster.start_worker("w1", delay_ms=0 if netem else 100)
        if not netem:
            redis_url = "redis://127.0.0.1:6379/0"  # the worker's way out, through the delay
        ping = cluster.hosts.run("w1", [sys.executable, "-c", PING, redis_url]).stdout
        assert float(ping) >= 0.2  # a round trip really takes two delays
        job = http.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": HEAD}).json()
        done = wait_for_job(http, job["id"], timeout_s=300)
        assert done["status"] == "succeeded", done["error"]
        # Heartbeats kept up: one run, never requeued for a missed lease.
        assert done["attempts"] == 1
        statuses = [e["data"]["status"] for e in read_events(http, f"/v1/jobs/{job['id']}/events")
                    if e["event"] == "status"]
        assert "queued" not in statuses[1:], statuses
        assert [m["epoch"] for m in done["metrics"]] == list(range(1, len(done["metrics"]) + 1))
    finally:
        cluster.stop_worker("w1")
        if netem:
            cluster.hosts.restore("w1")
        cluster.start_worker("w1")
        cluster.start_worker("w2")


# Times one Redis PING (after connecting) from the host: what a heartbeat pays per round trip.
PING = """import sys, time, redis
client = redis.Redis.from_url(sys.argv[1], socket_timeout=10)
client.ping()
start = time.monotonic()
client.ping()
print(time.monotonic() - start)
"""
