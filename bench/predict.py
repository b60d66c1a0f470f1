"""Prediction speed through HTTP against the bare model, side by side in one run.

- Single image: p50/p99 latency of POST /predict (one PNG, sequential) against the bare
  forward of the same uint8 tensor in this process; prints the overhead (target p50 ≤ 5 ms).
- Throughput: 16 concurrent clients each sending one-image requests, against the bare batched
  forward at batch 16; prints ``ratio=`` (target ≥ 0.8). The server is `ftune serve`, with
  dynamic batching, on the same 2 cores.
"""

from __future__ import annotations

import os

# Both processes share 2 cores: OpenMP threads that spin after a forward would steal the CPU
# the other process's forward needs, and the interleaved samples would measure that instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import asyncio
import io
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import torch
from PIL import Image

from ftune.models.predictor import Predictor
from ftune.processes import free_port, ftune_command, wait_until
from ftune.service.auth.principal import Role
from ftune.testing.access import make_key
from ftune.testing.models import register_tiny_model

MODEL_ID = "f" * 32


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def prepare(work: Path, image_size: int | None) -> tuple[Path, Predictor, bytes]:
    home = work / "home"
    tiny = register_tiny_model(work, home, MODEL_ID, image_size)
    png = io.BytesIO()
    Image.open(next((tiny.images / "animal0").iterdir())).convert("RGB").resize(
        (256, 256)).save(png, "PNG")
    return home, Predictor.load(tiny.bundle, device="cpu"), png.getvalue()


def timed(fn, repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def http_throughput(url: str, headers: dict[str, str], png: bytes, clients: int,
                          seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            response = await http.post(f"{url}/v1/models/{MODEL_ID}/predict",
                                       files={"files": ("a.png", png)})
            response.raise_for_status()
            done += 1

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=headers) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return done / (time.perf_counter() - started)


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    """``ftune serve`` over ``home`` (no Redis, no training); returns it and its URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["FTUNE_RATE_PREDICTIONS"] = "10000000/minute"  # measure the path, not the limit
    server = subprocess.Popen([*ftune_command(), "serve", "--home", str(home),
                               "--port", str(port)], env=env)
    return server, f"http://127.0.0.1:{port}"


def wait_for_server(url: str, timeout_s: float = 60) -> None:
    wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, timeout_s,
               "ftune serve")


def single_image_latency(http: httpx.Client, predictor: Predictor, png: bytes,
                         tensor: torch.Tensor, repeats: int
                         ) -> tuple[list[float], list[float], list[float]]:
    """Latency samples (ms): the bare forward of one image, the same over HTTP, and the bare
    forward of a batch of 16."""
    def one_http() -> None:
        http.post(f"/v1/models/{MODEL_ID}/predict",
                  files={"files": ("a.png", png)}).raise_for_status()

    batch16 = tensor.repeat(16, 1, 1, 1)
    with torch.inference_mode():
        for _ in range(5):  # warm up both sides (model load, allocator, caches)
            one_http()
            predictor.probabilities(tensor)
        # Interleaved, one of each in turn, so drifting machine load hits both alike.
        bare: list[float] = []
        over_http: list[float] = []
        for _ in range(repeats):
            bare += timed(lambda: predictor.probabilities(tensor), 1)
            over_http += timed(one_http, 1)
        bare_batch = timed(lambda: predictor.probabilities(batch16), max(5, repeats // 4))
    return bare, over_http, bare_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-size", type=int, default=None, help="default: backbone's")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ftune-predict-bench-"))
    home, predictor, png = prepare(work, args.image_size)
    tensor = predictor.to_uint8([png])  # what the server computes from the same PNG
    key = make_key(f"sqlite:///{home / 'ftune.db'}", role=Role.MEMBER)
    server, url = start_server(home)
    try:
        wait_for_server(url)
        bare, over_http, bare_batch = single_image_latency(key.client(url, timeout=60),
                                                           predictor, png, tensor, args.repeats)
        bare_img_s = 16 / (statistics.median(bare_batch) / 1000)
        http_img_s = asyncio.run(http_throughput(url, key.headers, png, 16, args.seconds))
        stats = httpx.get(f"{url}/healthz", headers=key.headers).json()  # counters need a key
    finally:
        server.terminate()
        server.wait(30)
    report(predictor, args.repeats, bare, over_http, http_img_s, bare_img_s, stats)


def report(predictor: Predictor, repeats: int, bare: list[float], over_http: list[float],
           http_img_s: float, bare_img_s: float, stats: dict) -> None:
    p50_b, p99_b = statistics.median(bare), percentile(bare, 0.99)
    p50_h, p99_h = statistics.median(over_http), percentile(over_http, 0.99)
    size = predictor.preprocessing.input_size
    print(f"predict_latency http_p50_ms={p50_h:.2f} http_p99_ms={p99_h:.2f} "
          f"bare_p50_ms={p50_b:.2f} bare_p99_ms={p99_b:.2f} overhead_p50_ms={p50_h - p50_b:.2f} "
          f"overhead_p99_ms={p99_h - p99_b:.2f} target_overhead_p50_ms=5 image_size={size} "
          f"n={repeats}")
    print(f"predict_throughput http_img_s={http_img_s:.1f} bare_batch16_img_s={bare_img_s:.1f} "
          f"ratio={http_img_s / bare_img_s:.3f} target_ratio=0.8 clients=16 "
          f"server_batches={stats['predict_batches']} server_images={stats['predict_images']}")


if __name__ == "__main__":
    main()
