"""The API process's memory under large and hostile uploads, on a fresh `ftune api` each.

- dataset: peak RSS growth while it receives, unpacks and checks a generated archive of at
  least 1 GB (target under 100 MB), and the end-to-end throughput in MB/s (request start →
  201 with the lint report).
- predict-bomb: requests of 64 pixel bombs each (12000×12000 PNGs of 17 kB that would decode
  to about 430 MB each) to /predict of a loaded model; peak RSS growth over the model's
  steady state (target under 300 MB), and that every request is refused with 422.
- entries: how long the API takes to refuse archives of 200,000 empty files named like images
  (a zip, refused from its central directory, and a tar.gz, refused as its headers stream),
  beside the rate in entries per second at which it unpacks (in-process) and accepts (request
  start → 201) a real dataset of 10,000 small PNGs, measured in the same run; and what the
  empty archive would have cost at that rate, as it did before such entries were counted.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from ftune.models.data.archives import ArchiveLimits, unpack
from ftune.processes import free_port, ftune_command
from ftune.service.auth.principal import Role
from ftune.testing.access import make_key
from ftune.testing.archives import tar_of_empty_files, zip_of_empty_files

MB = 2**20


def write_archive(path: Path, target_bytes: int, side: int, classes: int) -> int:
    """A plain tar of random-pixel BMPs (incompressible, quick to write and decode)."""
    rng = np.random.default_rng(0)
    count = 0
    with tarfile.open(path, "w") as archive:
        while path.stat().st_size < target_bytes:
            buffer = io.BytesIO()
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buffer, "BMP")
            info = tarfile.TarInfo(f"bench/class{count % classes}/{count:05d}.bmp")
            info.size = buffer.tell()
            buffer.seek(0)
            archive.addfile(info, buffer)
            count += 1
            archive.fileobj.flush()
    return count


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", choices=["dataset", "predict-bomb", "entries", "all"],
                        default="all")
    parser.add_argument("--size-mb", type=int, default=1100)
    parser.add_argument("--side", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--bomb-requests", type=int, default=5)
    parser.add_argument("--empty-entries", type=int, default=200_000)
    parser.add_argument("--images", type=int, default=10_000,
                        help="small PNGs of the real dataset in the entries case")
    args = parser.parse_args()
    if args.case in ("dataset", "all"):
        dataset_case(args.size_mb, args.side)
    if args.case in ("predict-bomb", "all"):
        predict_bomb_case(args.bomb_requests)
    if args.case in ("entries", "all"):
        entries_case(args.empty_entries, args.images)


class Api:
    """A fresh `ftune api` on its own data directory (the broker is never reached here)."""

    def __init__(self, home: Path) -> None:
        self.home, port = home, free_port()
        env = {**os.environ, "FTUNE_HOME": str(home), "FTUNE_MAX_UPLOAD_MB": "8192",
               "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
               "FTUNE_RATE_PREDICTIONS": "100000/minute"}
        self.process = subprocess.Popen([*ftune_command(), "api", "--port", str(port)],
                                        env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{self.url}/healthz", timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise SystemExit("the API did not start") from None
                time.sleep(0.2)
        self.headers = make_key(f"sqlite:///{home / 'ftune.db'}", role=Role.ADMIN).headers

    def rss_kb(self) -> int:
        return rss_kb(self.process.pid, "VmRSS")

    def reset_peak(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")  # resets VmHWM

    def peak_kb(self) -> int:
        return rss_kb(self.process.pid, "VmHWM")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def dataset_case(size_mb: int, side: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="ftune-upload-bench-"))
    try:
        archive = work / "big.tar"
        images = write_archive(archive, size_mb * MB, side, classes=5)
        archive_mb = archive.stat().st_size / MB
        api = Api(work / "home")
        try:
            before = api.rss_kb()
            api.reset_peak()
            samples: list[int] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    samples.append(api.rss_kb())
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.perf_counter()
            with open(archive, "rb") as f:
                response = httpx.post(f"{api.url}/v1/datasets", files={"file": ("big.tar", f)},
                                      timeout=3600, headers=api.headers)
            elapsed = time.perf_counter() - started
            stop.set()
            sampler.join()
            peak = api.peak_kb()
        finally:
            api.stop()
        if response.status_code != 201:
            raise SystemExit(f"upload failed: {response.status_code} {response.text[:500]}")
        body = response.json()
        assert body["num_images"] == images, (body["num_images"], images)
        growth = (peak - before) / 1024
        print(f"upload_memory archive_mb={archive_mb:.0f} images={images} "
              f"image={side}x{side} upload_s={elapsed:.1f} "
              f"throughput_mb_s={archive_mb / elapsed:.1f} rss_before_mb={before / 1024:.0f} "
              f"peak_rss_growth_mb={growth:.1f} sampled_peak_growth_mb="
              f"{(max(samples) - before) / 1024:.1f} target_growth_mb=100 "
              f"report_ok={body['report']['ok']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def predict_bomb_case(requests: int, per_request: int = 64) -> None:
    from ftune.testing.models import register_tiny_model

    work = Path(tempfile.mkdtemp(prefix="ftune-bomb-bench-"))
    try:
        model_id = "b" * 32
        register_tiny_model(work, work / "home", model_id, image_size=64)
        bomb = io.BytesIO()
        Image.new("1", (12_000, 12_000)).save(bomb, "PNG")
        ok = io.BytesIO()
        Image.new("RGB", (64, 64), (10, 120, 30)).save(ok, "PNG")
        api = Api(work / "home")
        try:
            predict = f"{api.url}/v1/models/{model_id}/predict"
            warm = httpx.post(predict, files={"files": ("ok.png", ok.getvalue())},
                              headers=api.headers, timeout=120)
            assert warm.status_code == 200, warm.text  # torch and the model are loaded now
            before = api.rss_kb()
            api.reset_peak()
            statuses = []
            started = time.perf_counter()
            for _ in range(requests):
                files = [("files", (f"bomb{i}.png", bomb.getvalue()))
                         for i in range(per_request)]
                statuses.append(httpx.post(predict, files=files, headers=api.headers,
                                           timeout=300).status_code)
            elapsed = time.perf_counter() - started
            peak = api.peak_kb()
        finally:
            api.stop()
        print(f"upload_memory case=predict-bomb requests={requests} images_per_request="
              f"{per_request} bomb_kb={len(bomb.getvalue()) / 1024:.0f} "
              f"decoded_mb_each={12_000 * 12_000 * 3 / MB:.0f} statuses={sorted(set(statuses))} "
              f"seconds_per_request={elapsed / requests:.2f} rss_before_mb={before / 1024:.0f} "
              f"peak_rss_growth_mb={(peak - before) / 1024:.1f} target_growth_mb=300")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_small_images(path: Path, count: int, side: int = 32, classes: int = 10) -> None:
    """A plain tar of ``count`` random-pixel PNGs in ``classes`` class folders."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as archive:
        for index in range(count):
            buffer = io.BytesIO()
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buffer, "PNG")
            info = tarfile.TarInfo(f"bench/class{index % classes}/{index:06d}.png")
            info.size = buffer.tell()
            buffer.seek(0)
            archive.addfile(info, buffer)


def timed_upload(api: Api, payload: bytes, filename: str, status: int) -> tuple[float, dict]:
    """Seconds from request start to the answer, which must have ``status``; its body."""
    started = time.perf_counter()
    response = httpx.post(f"{api.url}/v1/datasets", files={"file": (filename, payload)},
                          params={"dedupe": "false"}, timeout=3600, headers=api.headers)
    elapsed = time.perf_counter() - started
    if response.status_code != status:
        raise SystemExit(f"{filename}: {response.status_code} {response.text[:500]}")
    return elapsed, response.json()


def entries_case(empty_entries: int, images: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="ftune-entries-bench-"))
    try:
        legit = work / "legit.tar"
        write_small_images(legit, images)
        started = time.perf_counter()
        unpack(legit, work / "unpacked", ArchiveLimits(max_bytes=1 << 40, max_files=10**6))
        unpack_rate = images / (time.perf_counter() - started)
        shutil.rmtree(work / "unpacked")
        hostile = {"zip": zip_of_empty_files(empty_entries),
                   "tar_gz": tar_of_empty_files(empty_entries)}
        api = Api(work / "home")
        try:
            upload_s, body = timed_upload(api, legit.read_bytes(), "legit.tar", 201)
            assert body["num_images"] == images, (body["num_images"], images)
            refusals = {}
            for kind, payload in hostile.items():
                refusals[kind], body = timed_upload(api, payload, f"empty.{kind}", 422)
                assert "cannot be images" in body["detail"], body["detail"]
        finally:
            api.stop()
        upload_rate = images / upload_s
        print(f"upload_memory case=entries images={images} unpack_entries_s={unpack_rate:.0f} "
              f"upload_s={upload_s:.1f} upload_entries_s={upload_rate:.0f} "
              f"empty_entries={empty_entries} zip_mb={len(hostile['zip']) / MB:.1f} "
              f"refuse_zip_s={refusals['zip']:.2f} tar_gz_mb={len(hostile['tar_gz']) / MB:.1f} "
              f"refuse_tar_gz_s={refusals['tar_gz']:.2f} "
              f"at_upload_rate_s={empty_entries / upload_rate:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
