"""The service spread over hosts with its blobs in S3 (ftune/testing/cluster.py) against the
same service on one host with the local blob store, measured side by side in one run. The
machine is shared and noisy, so the targets are ratios, never absolute times.

Usage: ``.venv/bin/python bench/hosts.py [--only jobs upload recovery] [--archive-mb 1024]``

* ``jobs``: the animal dataset's default job (``{}`` on bench/defaults.py's animal-mnist:
  3,000 training and 1,000 held-out images) from submit to succeeded, on a one-host ``Stack``
  (local store, SQLite, one worker) and on a ``Cluster`` with one worker host (S3 store,
  PostgreSQL; one worker host so both use the same cores). Interleaved: local, cluster, then a
  second job of each on the same data (its dataset, decoded images and features cached on the
  worker's host). Targets: first jobs S3/local <= 1.15; second jobs S3/local <= 1.05 (both
  with warm caches), the worker fetching the dataset from the store only once.
* ``upload``: an archive of about ``--archive-mb`` MB of large real images (animal
  silhouettes upscaled, with noise so they do not compress) uploaded through the cluster's
  API into S3: the API process's RSS growth (sampled VmRSS peak minus before; target <= 100
  MB) and its throughput against boto3 uploading the same file to the same store from the
  control host, where the API runs (target API/direct >= 0.7).
* ``recovery``: two worker hosts; a slow job runs on w1, w2's worker starts after 2 epochs,
  then w1 is cut off the network: seconds until the job runs again on w2 (attempts >= 2) and
  until it succeeds, against two heartbeat leases (2 x FTUNE_JOB_STALE_S; target <= 1.0).

Every file is made under one temporary folder, removed at the end; the stacks, clusters and
their hosts are context managers, so nothing is left running.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import psutil
from defaults import animal_mnist
from PIL import Image

from ftune.processes import Stack, wait_until
from ftune.service.auth.principal import Role
from ftune.testing.access import make_key
from ftune.testing.archives import tar_folder, zip_folder
from ftune.testing.cluster import BUCKET, FAST, Cluster
from ftune.testing.realdata import animal_mnist_arrays, balanced_indices, write_image_folder
from ftune.testing.sse import read_events

MB = 2**20
PARTS = ("jobs", "upload", "recovery")
TERMINAL = {"succeeded", "failed", "cancelled"}
DEFAULT_SPEC: dict = {}  # the animal dataset's default job, as bench/defaults.py runs it
# Every layer trains on a tiny dataset: a few seconds an epoch, long enough to be cut mid-run.
SLOW = {"image_size": 48, "batch_size": 6, "epochs": 8, "freeze": {"strategy": "none"},
        "early_stopping": {"patience": 100}, "seed": 5}


def verdict(ratio: float, target: float, at_most: bool = True) -> str:
    met = ratio <= target if at_most else ratio >= target
    return (f"ratio {ratio:.2f} (target {'<=' if at_most else '>='} {target:g}: "
            f"{'met' if met else 'MISSED'})")


def wait_job(http: httpx.Client, job_id: str, timeout_s: float = 900,
             done: Callable[[dict], bool] = lambda job: job["status"] in TERMINAL) -> dict:
    return wait_until(lambda: (job := http.get(f"/v1/jobs/{job_id}").json()) and done(job)
                      and job, timeout_s, f"job {job_id}", interval_s=0.1)


def timed_job(http: httpx.Client, dataset_id: str, spec: dict) -> tuple[float, dict]:
    """Seconds from submit to succeeded, and the job."""
    started = time.perf_counter()
    job = http.post("/v1/jobs", json={"dataset_id": dataset_id, "spec": spec}).json()
    job = wait_job(http, job["id"])
    elapsed = time.perf_counter() - started
    if job["status"] != "succeeded":
        raise SystemExit(f"job {job['id']} ended {job['status']}: {job['error']}")
    return elapsed, job


def upload_dataset(http: httpx.Client, name: str, archive: bytes) -> dict:
    response = http.post("/v1/datasets", files={"file": (name, archive)})
    if response.status_code != 201:
        raise SystemExit(f"upload failed: {response.status_code} {response.text[:500]}")
    return response.json()


# -- 1. the same job on the local store and on S3 across hosts ------------------------------
def local_stack(work: Path) -> Stack:
    """One host: private Redis, the API and one worker over one data directory, SQLite, the
    local blob store; the cluster's fast settings and thread limits, so only the store and
    the hosts differ."""
    stack = Stack(work / "local", env={**FAST, "FTUNE_STORAGE": ""}, log_dir=work / "local-logs")
    try:
        stack.start_redis()
        stack.start_api()
        stack.start_worker("local@bench")
    except BaseException:
        stack.stop_all()
        raise
    return stack


def jobs_part(work: Path, cluster: Cluster) -> None:
    archive = tar_folder(animal_mnist(work / "animal"))
    with local_stack(work) as stack, cluster.client(timeout=300) as remote:
        key = make_key(f"sqlite:///{stack.home / 'ftune.db'}", role=Role.ADMIN)
        assert stack.api_url is not None
        with key.client(stack.api_url, timeout=300) as local:
            here = upload_dataset(local, "animal.tar.gz", archive)["id"]
            there = upload_dataset(remote, "animal.tar.gz", archive)["id"]
            local_first, job = timed_job(local, here, DEFAULT_SPEC)
            s3_first, _ = timed_job(remote, there, DEFAULT_SPEC)
            local_second, _ = timed_job(local, here, DEFAULT_SPEC)
            s3_second, _ = timed_job(remote, there, DEFAULT_SPEC)
    fetches = cluster.log("w1").count(f"fetched datasets/{there}/images.tar")
    resolved = {k: job["resolved"][k]["value"] for k in ("backbone", "image_size", "epochs")
                if k in job["resolved"]}
    print(f"hosts: default job {DEFAULT_SPEC} on animal-mnist ({resolved}), submit to "
          f"succeeded: local store one host {local_first:.1f} s, S3 across hosts "
          f"{s3_first:.1f} s, {verdict(s3_first / local_first, 1.15)}", flush=True)
    print(f"hosts: second job, same data, same host (dataset cached): local "
          f"{local_second:.1f} s, S3 across hosts {s3_second:.1f} s, "
          f"{verdict(s3_second / local_second, 1.05)}; w1 fetched the dataset "
          f"{fetches} time(s) (only once: {fetches == 1})", flush=True)


# -- 2. a large upload through the API into S3 ----------------------------------------------
def noisy_image(silhouette: np.ndarray, side: int, rng: np.random.Generator) -> bytes:
    """An animal silhouette upscaled to side x side, RGB with strong per-pixel noise (so it
    does not compress), as a PNG."""
    big = np.asarray(Image.fromarray(silhouette).resize((side, side), Image.BILINEAR))
    noise = rng.integers(0, 128, (side, side, 3), dtype=np.uint8)
    pixels = (big[:, :, None] // 2 + noise).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", compress_level=1)
    return out.getvalue()


def write_big_archive(path: Path, target_bytes: int, side: int, classes: int = 5) -> int:
    """A plain tar of large noisy animal PNGs, ``classes`` classes, until ``target_bytes``
    (and at least 2 a class); returns the number of images."""
    images, labels = animal_mnist_arrays()
    idx = balanced_indices(labels, 1000, classes=classes)
    rng = np.random.default_rng(0)
    count = 0
    with tarfile.open(path, "w") as archive:
        while path.stat().st_size < target_bytes or count < 2 * classes:
            i = idx[(count % classes) * 1000 + count // classes]
            data = noisy_image(images[i], side, rng)
            info = tarfile.TarInfo(f"bench/animal{labels[i]}/{count:05d}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
            archive.fileobj.flush()
            count += 1
    return count


def decode_seconds(archive: Path) -> float:
    """Seconds this process takes to decode every image of the archive once (what checking
    an upload costs at the least)."""
    started = time.perf_counter()
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.isfile():
                with Image.open(tar.extractfile(member)) as image:
                    image.load()
    return time.perf_counter() - started


def api_pid(cluster: Cluster) -> int:
    """The API's own process: the one started on the control host, or the descendant that
    runs ``ftune api`` (the start goes through nsenter and sh, which exec it)."""
    started = psutil.Process(cluster.api_process.pid)
    for process in [started, *started.children(recursive=True)]:
        command = process.cmdline()
        if "ftune" in command and "api" in command:
            return process.pid
    raise SystemExit(f"no `ftune api` process under pid {started.pid}")


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class RssSampler:
    """VmRSS of ``pid`` every 50 ms on a thread, and its kernel-kept peak (VmHWM, reset at
    start), from start until ``stop``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = status_kb(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from now
        self.samples = [self.before]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(status_kb(self.pid, "VmRSS"))

    def stop(self) -> tuple[float, float]:
        """Growth in MB: sampled peak minus before, and the kernel's peak minus before."""
        self._stop.set()
        self._thread.join()
        hwm = status_kb(self.pid, "VmHWM")
        return (max(self.samples) - self.before) / 1024, (hwm - self.before) / 1024


class StoreWatch:
    """Notes when the API starts writing the dataset into the store (its multipart upload
    under datasets/ appears in the bucket), polling from now until ``stop``."""

    def __init__(self, cluster: Cluster) -> None:
        self.client, self.prefix = cluster.s3_client(), f"{cluster.prefix}/datasets/"
        self.seen_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while self.seen_at is None and not self._stop.wait(0.1):
            found = self.client.list_multipart_uploads(Bucket=BUCKET, Prefix=self.prefix)
            if found.get("Uploads"):
                self.seen_at = time.perf_counter()

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self.seen_at


def upload_through_api(cluster: Cluster, archive: Path) -> tuple[dict[str, float], dict]:
    """The API's upload, timed: ``total`` (request to 201) and ``storing`` (its write into
    the store begun), from the request's start; ``rss_mb`` and ``peak_mb``: the API's sampled
    and kernel-kept RSS growth. And the dataset."""
    sampler, watch = RssSampler(api_pid(cluster)), StoreWatch(cluster)
    try:
        with cluster.client(timeout=3600) as http, archive.open("rb") as body:
            started = time.perf_counter()
            response = http.post("/v1/datasets", files={"file": ("big.tar", body)})
            ended = time.perf_counter()
    finally:
        rss_mb, peak_mb = sampler.stop()
        storing_at = watch.stop()
    if response.status_code != 201:
        raise SystemExit(f"upload failed: {response.status_code} {response.text[:500]}")
    times = {"total": ended - started, "storing": (storing_at or ended) - started,
             "rss_mb": rss_mb, "peak_mb": peak_mb}
    return times, response.json()


DIRECT = """
import json, os, sys, time
import boto3
from botocore.config import Config
client = boto3.session.Session().client("s3", region_name=os.environ["AWS_REGION"],
                                        config=Config(s3={"addressing_style": "path"}))
path, bucket, key, how = sys.argv[1:]
started = time.perf_counter()
if how == "upload_file":  # boto3's managed transfer: 8 MiB parts, 10 threads
    client.upload_file(path, bucket, key)
else:  # 8 MiB parts one after the other, as the API's store writes them
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    parts = []
    with open(path, "rb") as f:
        while data := f.read(8 << 20):
            n = len(parts) + 1
            etag = client.upload_part(Bucket=bucket, Key=key, PartNumber=n, UploadId=upload,
                                      Body=data)["ETag"]
            parts.append({"PartNumber": n, "ETag": etag})
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload,
                                     MultipartUpload={"Parts": parts})
elapsed = time.perf_counter() - started
size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
client.delete_object(Bucket=bucket, Key=key)
print(json.dumps({"seconds": elapsed, "bytes": size}))
"""
DIRECT_WAYS = ("upload_file", "sequential_parts")


def upload_direct(cluster: Cluster, archive: Path) -> dict[str, float]:
    """Seconds boto3 takes to put the same file into the same bucket from the control host,
    each way of ``DIRECT_WAYS`` (the file linked into the host's private /tmp; each object
    deleted after)."""
    seen = cluster.hosts.tmp_dir("control") / archive.name
    try:
        os.link(archive, seen)
    except OSError:
        shutil.copyfile(archive, seen)
    seconds = {}
    try:
        for how in DIRECT_WAYS:
            result = cluster.hosts.run(
                "control", [sys.executable, "-c", DIRECT, f"/tmp/{archive.name}", BUCKET,
                            f"{cluster.prefix}/bench/direct.tar", how],
                env=cluster.service_env, timeout_s=1800)
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            assert measured["bytes"] == archive.stat().st_size, measured
            seconds[how] = measured["seconds"]
    finally:
        seen.unlink(missing_ok=True)
    return seconds


def upload_part(work: Path, cluster: Cluster, archive_mb: int, side: int) -> None:
    archive = work / "upload" / "big.tar"
    archive.parent.mkdir()
    try:
        started = time.perf_counter()
        images = write_big_archive(archive, archive_mb * MB, side)
        made_s, size_mb = time.perf_counter() - started, archive.stat().st_size / MB
        decode_s = decode_seconds(archive)
        api, dataset = upload_through_api(cluster, archive)
        assert dataset["num_images"] == images, (dataset["num_images"], images)
        direct = upload_direct(cluster, archive)
    finally:
        archive.unlink(missing_ok=True)
    with cluster.client() as http:  # the store keeps objects in memory: free it
        http.delete(f"/v1/datasets/{dataset['id']}")
    report_upload(size_mb, images, side, made_s, decode_s, api, direct)


def report_upload(size_mb: float, images: int, side: int, made_s: float, decode_s: float,
                  api: dict[str, float], direct: dict[str, float]) -> None:
    api_rate, direct_rate = size_mb / api["total"], size_mb / direct["upload_file"]
    growth = max(api["rss_mb"], api["peak_mb"])
    print(f"hosts: upload of a {size_mb:.0f} MB archive ({images} PNGs of {side}x{side}, "
          f"made in {made_s:.0f} s, decoded once here in {decode_s:.1f} s) through the API "
          f"into S3: API RSS growth {api['rss_mb']:.1f} MB sampled (kernel peak "
          f"{api['peak_mb']:.1f} MB) (target <= 100: {'met' if growth <= 100 else 'MISSED'})",
          flush=True)
    print(f"hosts: upload throughput API {api_rate:.1f} MB/s ({api['total']:.1f} s from "
          f"request to 201: received, unpacked and checked until the store write "
          f"began at {api['storing']:.1f} s, stored in "
          f"{api['total'] - api['storing']:.1f} s) vs boto3 upload_file on the control host "
          f"{direct_rate:.1f} MB/s ({direct['upload_file']:.1f} s; 8 MiB parts one at a "
          f"time as the API writes them: {size_mb / direct['sequential_parts']:.1f} MB/s), "
          f"{verdict(api_rate / direct_rate, 0.7, at_most=False)}", flush=True)


# -- 3. a worker host cut off mid-job --------------------------------------------------------
def tiny_archive(work: Path) -> bytes:
    """3 classes x 12 animal images (the tests' tiny dataset)."""
    images, labels = animal_mnist_arrays()
    idx = balanced_indices(labels, 12, classes=3)
    return zip_folder(write_image_folder(work / "tiny", images[idx], labels[idx]))


def running_hosts(http: httpx.Client, job_id: str) -> list[str]:
    """The host of each run of the job, in order (from its status events)."""
    events = read_events(http, f"/v1/jobs/{job_id}/events")
    return [e["data"]["worker"].split("@", 1)[0] for e in events
            if e["event"] == "status" and e["data"].get("status") == "running"]


def start_on_w1_then_cut(cluster: Cluster, http: httpx.Client, dataset_id: str) -> str:
    """The slow job running on w1 with 2 epochs done, w2's worker up; returns its id."""
    cluster.stop_worker("w2")  # so the job starts on w1
    job = http.post("/v1/jobs", json={"dataset_id": dataset_id, "spec": SLOW}).json()
    wait_until(lambda: len(http.get(f"/v1/jobs/{job['id']}").json()["metrics"]) >= 2, 300,
               "two finished epochs on w1")
    cluster.start_worker("w2")
    now = http.get(f"/v1/jobs/{job['id']}").json()
    if now["status"] != "running" or len(now["metrics"]) >= SLOW["epochs"]:
        raise SystemExit(f"the job ended before w1 could be cut ({now['status']}); "
                         "make its epochs longer")
    return job["id"]


def recovery_part(work: Path) -> None:
    with Cluster(work / "cluster-recovery", workers=("w1", "w2")) as cluster, \
            cluster.client() as http:
        dataset = upload_dataset(http, "tiny.zip", tiny_archive(work))
        job_id = start_on_w1_then_cut(cluster, http, dataset["id"])
        cluster.hosts.cut("w1")  # the cable pulled: w1 trains on, alone
        cut_at = time.monotonic()
        try:
            taken = wait_job(http, job_id, 300, lambda job: job["status"] in TERMINAL
                             or (job["attempts"] >= 2 and job["status"] == "running"))
            recovered_s = time.monotonic() - cut_at
            if taken["attempts"] < 2:
                raise SystemExit(f"the job ended {taken['status']} without being taken over")
            done = wait_job(http, job_id, 600)
            finished_s = time.monotonic() - cut_at
        finally:
            cluster.hosts.restore("w1")
        if done["status"] != "succeeded":
            raise SystemExit(f"the job ended {done['status']}: {done['error']}")
        hosts = running_hosts(http, job_id)
        lease = float(cluster.service_env["FTUNE_JOB_STALE_S"])
    print(f"hosts: recovery after w1 was cut off mid-job ({SLOW['epochs']} epochs, runs on "
          f"{' then '.join(hosts)}, attempts {done['attempts']}): running again on w2 "
          f"{recovered_s:.1f} s after the cut, succeeded {finished_s:.1f} s after it; "
          f"against 2 leases ({2 * lease:g} s) {verdict(recovered_s / (2 * lease), 1.0)}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--archive-mb", type=int, default=1024, help="size of the upload")
    parser.add_argument("--image-side", type=int, default=2048,
                        help="side in pixels of the upload's images")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftune-hosts-bench-"))
    limits = {"FTUNE_MAX_UPLOAD_MB": str(max(2048, 2 * args.archive_mb)),
              "FTUNE_MAX_EXTRACTED_MB": str(max(20480, 4 * args.archive_mb))}
    try:
        if "jobs" in args.only or "upload" in args.only:
            with Cluster(work / "cluster", workers=("w1",), env=limits) as cluster:
                if "jobs" in args.only:
                    jobs_part(work, cluster)
                if "upload" in args.only:
                    upload_part(work, cluster, args.archive_mb, args.image_side)
        if "recovery" in args.only:
            recovery_part(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
