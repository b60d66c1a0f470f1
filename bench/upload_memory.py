"""Memory and speed of a large dataset upload: the API process's peak RSS growth while it
receives, unpacks and checks a generated archive of at least 1 GB (target under 100 MB), and
the end-to-end throughput in MB/s (request start → 201 with the lint report)."""

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

from ftune.processes import free_port, ftune_command
from ftune.service.auth.principal import Role
from ftune.testing.access import make_key

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
    parser.add_argument("--size-mb", type=int, default=1100)
    parser.add_argument("--side", type=int, default=1024, help="image side in pixels")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ftune-upload-bench-"))
    try:
        archive = work / "big.tar"
        images = write_archive(archive, args.size_mb * MB, args.side, classes=5)
        size_mb = archive.stat().st_size / MB
        port = free_port()
        env = {**os.environ, "FTUNE_HOME": str(work / "home"), "FTUNE_MAX_UPLOAD_MB": "8192",
               # The upload path never touches the broker; nothing listens on this port.
               "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
        api = subprocess.Popen([*ftune_command(), "api", "--port", str(port)],
                               env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(f"{url}/healthz", timeout=2)
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise SystemExit("the API did not start") from None
                    time.sleep(0.2)
            key = make_key(f"sqlite:///{work / 'home' / 'ftune.db'}", role=Role.ADMIN)
            before = rss_kb(api.pid, "VmRSS")
            Path(f"/proc/{api.pid}/clear_refs").write_text("5")  # reset the peak (VmHWM)
            samples: list[int] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    samples.append(rss_kb(api.pid, "VmRSS"))
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.perf_counter()
            with open(archive, "rb") as f:
                response = httpx.post(f"{url}/v1/datasets", files={"file": ("big.tar", f)},
                                      timeout=3600, headers=key.headers)
            elapsed = time.perf_counter() - started
            stop.set()
            sampler.join()
            peak = rss_kb(api.pid, "VmHWM")
        finally:
            api.terminate()
            api.wait(30)
        if response.status_code != 201:
            raise SystemExit(f"upload failed: {response.status_code} {response.text[:500]}")
        body = response.json()
        assert body["num_images"] == images, (body["num_images"], images)
        growth = (peak - before) / 1024
        print(f"upload_memory archive_mb={size_mb:.0f} images={images} "
              f"image={args.side}x{args.side} upload_s={elapsed:.1f} "
              f"throughput_mb_s={size_mb / elapsed:.1f} rss_before_mb={before / 1024:.0f} "
              f"peak_rss_growth_mb={growth:.1f} sampled_peak_growth_mb="
              f"{(max(samples) - before) / 1024:.1f} target_growth_mb=100 "
              f"report_ok={body['report']['ok']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
