"""Prediction speed by serving engine, in process and through HTTP, side by side in one run.

The model: lite0 tuned with ``{"preset": "fast"}`` on animal-mnist (``--train`` training and
``--test`` held-out images per class) at ``--image-size`` (default 224, the backbone's own),
recorded with its dataset in a fresh data directory. Its serving preparation runs as the API
runs it (``ftune serving-check`` in a child process): the parity check and the int8 guard
on the animal test split.

- ``predict_int8``: fp32 and int8 accuracy on the test split, the drop in points, the share
  of images where int8 gives fp32's answer, whether int8 is offered (target: drop ≤ 0.5).
- ``predict_inprocess``: the limit. Eager torch (channels-last, inference mode), ONNX Runtime
  fp32 and int8 at batch 1 and 16, one forward at a time on every core, images per second,
  measured in alternating blocks, and each engine's ratio to torch.
- ``predict_lanes``: the limit as the server runs forwards (models/serving/lanes.py): the
  host's lanes side by side, each on its share of the cores, at batch 1, 2 and 4.
- ``predict_batch``: the batch size each ONNX Runtime engine was measured fastest at in its
  lanes by the preparation (models/serving/batch_size.py), which the server batches up to.
- ``predict_serving``: ``ftune serve`` under FTUNE_SERVE_ENGINE=torch (in lanes, and in one
  lane as before lanes), auto and int8 (one server each, measured in alternating blocks):
  16 concurrent one-image clients, throughput divided by the same engine's in-process
  batch-16 throughput (target ≥ 0.8), by its
  better in-process rate of batch 1 and 16, and by its best rate in lanes, and the
  single-image p50 overhead over the same engine's bare forward (target ≤ 5 ms).
  ``predict_clients``: the share of the machine's cores the clients themselves used while
  measured, which the server did not have.
- ``predict_auto_vs_torch``: /predict throughput under auto divided by under torch, as torch
  served before lanes (one forward at a time on every core: the issue's "today's torch
  path") and in lanes (target ≥ 1.5).
"""

from __future__ import annotations

import os

# The processes share the cores: OpenMP threads that spin after a forward would steal the CPU
# the next measured forward needs, and the interleaved samples would measure that instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import asyncio
import io
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from ftune.models.predictor import Predictor
from ftune.models.serving.batch_size import images_per_second
from ftune.models.serving.batch_size import in_lanes as lanes_rate
from ftune.models.serving.engines import FP32_FILE, INT8_FILE
from ftune.models.serving.lanes import LaneLayout, lane_layout
from ftune.models.serving.onnx_runner import OnnxRunner
from ftune.processes import free_port, ftune_command, wait_until
from ftune.service.auth.principal import Role
from ftune.service.blobs.keys import serving_key
from ftune.service.db.session import Database
from ftune.service.db.tables import TunedModel
from ftune.service.exports import ExportSlots
from ftune.service.serving import ServingEngines
from ftune.service.settings import Settings
from ftune.service.storage import Storage
from ftune.testing.access import make_key
from ftune.testing.models import register_model
from ftune.testing.realdata import animal_mnist_arrays, balanced_indices, write_image_folder

MODEL_ID = "f" * 32
# Each server: its name -> (FTUNE_SERVE_ENGINE, the engine that serves, FTUNE_SERVE_LANES).
# "torch-one-lane" is the torch path as it was before lanes: one forward at a time on every
# core.
SERVERS = {"torch-one-lane": ("torch", "torch", 1), "torch": ("torch", "torch", 0),
           "auto": ("auto", "onnxruntime", 0), "int8": ("int8", "onnxruntime-int8", 0)}
# uint8 [N, 3, S, S] and the threads it may use (None: every core) -> probabilities
Forward = Callable[[np.ndarray, int | None], object]
LANE_SIZES = (1, 2, 4)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def prepare(work: Path, image_size: int | None, train: int, test: int
            ) -> tuple[Path, Predictor, dict, Path]:
    """The model recorded with its dataset, prepared for serving: (home, the torch
    predictor, the preparation's report, the prepared files on this host)."""
    images, labels = animal_mnist_arrays()
    data = work / "data"
    for split, per_class, offset in (("train", train, 0), ("test", test, train)):
        idx = balanced_indices(labels, per_class, offset=offset)
        write_image_folder(data / split, images[idx], labels[idx])
    home = work / "home"
    tuned = register_model(data, home, MODEL_ID, {"preset": "fast", "image_size": image_size},
                           with_dataset=True)
    settings = Settings(home=home)
    storage = Storage(home)
    db = Database(settings.resolved_database_url)
    with db.session() as session:
        model = session.get(TunedModel, MODEL_ID)
        assert model is not None
        session.expunge(model)
    serving = ServingEngines(db, storage, settings, ExportSlots(1)).prepare(model)
    folder = storage.local_tree(serving_key(MODEL_ID), serving["sha256"])
    db.dispose()
    return home, Predictor.load(tuned.bundle, device="cpu"), serving["report"], folder


def rate(forward: Forward, batch: np.ndarray, seconds: float) -> float:
    """Images per second over about ``seconds`` of forwards of ``batch`` on every core."""
    forward(batch, None)  # warm
    return images_per_second(lambda b: forward(b, None), batch, seconds)


def in_lanes(engines: dict[str, Forward], image: np.ndarray, rounds: int, seconds: float,
             layout: LaneLayout) -> dict[tuple[str, int], float]:
    """Median images/s of each engine in ``layout``'s lanes at each of LANE_SIZES."""
    samples: dict[tuple[str, int], list[float]] = {}
    with ThreadPoolExecutor(layout.lanes) as pool:
        for _ in range(rounds):
            for name, forward in engines.items():
                for size in LANE_SIZES:
                    batch = np.repeat(image, size, axis=0)
                    lanes_rate(pool, forward, batch, layout, 0.0)  # warm each lane
                    samples.setdefault((name, size), []).append(
                        lanes_rate(pool, forward, batch, layout, seconds))
    return {key: statistics.median(values) for key, values in samples.items()}


def in_process(engines: dict[str, Forward], image: np.ndarray, rounds: int,
               seconds: float) -> dict[tuple[str, int], float]:
    """Median images/s of each engine at batch 1 and 16, in alternating blocks."""
    samples: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for name, forward in engines.items():
            for size in (1, 16):
                batch = np.repeat(image, size, axis=0)
                samples.setdefault((name, size), []).append(rate(forward, batch, seconds))
    return {key: statistics.median(values) for key, values in samples.items()}


def start_server(home: Path, policy: str, lanes: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["FTUNE_RATE_PREDICTIONS"] = "10000000/minute"  # measure the path, not the limit
    env["FTUNE_SERVE_ENGINE"] = policy
    env["FTUNE_SERVE_LANES"] = str(lanes)
    server = subprocess.Popen([*ftune_command(), "serve", "--home", str(home),
                               "--port", str(port)], env=env)
    return server, f"http://127.0.0.1:{port}"


async def http_throughput(url: str, headers: dict[str, str], png: bytes, clients: int,
                          seconds: float) -> tuple[float, float]:
    """Images per second, and the share of all cores the clients themselves used."""
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
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - started
        # The clients run on this machine's cores too: the share they took is not the server's.
        return done / wall, (time.process_time() - cpu) / wall / (os.cpu_count() or 1)


def latency(http: httpx.Client, forward: Forward, png: bytes, image: np.ndarray,
            repeats: int) -> tuple[list[float], list[float]]:
    """Single-image samples (ms), interleaved: the bare forward, and the same over HTTP."""
    def one_http() -> None:
        http.post(f"/v1/models/{MODEL_ID}/predict",
                  files={"files": ("a.png", png)}).raise_for_status()

    bare: list[float] = []
    over_http: list[float] = []
    for _ in range(repeats):
        for fn, into in ((lambda: forward(image, None), bare), (one_http, over_http)):
            started = time.perf_counter()
            fn()
            into.append((time.perf_counter() - started) * 1000)
    return bare, over_http


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--train", type=int, default=100, help="training images per class")
    parser.add_argument("--test", type=int, default=100, help="test images per class")
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=12, help="per engine, over rounds")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ftune-predict-bench-"))
    home, predictor, report, files = prepare(work, args.image_size, args.train, args.test)
    report_int8(report)
    png_buffer = io.BytesIO()
    Image.open(next((work / "data" / "test").rglob("*.png"))).convert("RGB").resize(
        (256, 256)).save(png_buffer, "PNG")
    png = png_buffer.getvalue()
    image = predictor.to_uint8([png]).numpy()  # what the server computes from the same PNG
    layout = lane_layout("cpu")
    engines: dict[str, Forward] = {
        "torch": lambda b, t=None: predictor.probabilities(torch.from_numpy(b), t),
        "onnxruntime": OnnxRunner(files / FP32_FILE, threads=layout.widths)}
    if (files / INT8_FILE).exists():
        engines["onnxruntime-int8"] = OnnxRunner(files / INT8_FILE, threads=layout.widths)
    block_s = args.seconds / args.rounds / 2
    with torch.inference_mode():
        limits = in_process(engines, image, args.rounds, block_s)
        lanes = in_lanes(engines, image, args.rounds, block_s, layout)
    report_in_process(limits, predictor.preprocessing.input_size)
    report_lanes(lanes, layout)
    serve(home, engines, limits, lanes, png, image, args)


def serve(home: Path, engines: dict[str, Forward], limits: dict[tuple[str, int], float],
          lanes: dict[tuple[str, int], float], png: bytes, image: np.ndarray,
          args: argparse.Namespace) -> None:
    key = make_key(f"sqlite:///{home / 'ftune.db'}", role=Role.MEMBER)
    policies = {name: engine for name, (_, engine, _) in SERVERS.items() if engine in engines}
    servers = {name: start_server(home, SERVERS[name][0], SERVERS[name][2])
               for name in policies}
    try:
        for _, url in servers.values():
            wait_until(lambda u=url: httpx.get(f"{u}/healthz").status_code == 200, 60,
                       "ftune serve")
        overheads: dict[str, float] = {}
        rates: dict[str, list[float]] = {}
        client_cpu: list[float] = []
        for policy, (_, url) in servers.items():
            with torch.inference_mode(), key.client(url, timeout=120) as http:
                for _ in range(5):  # load the model, warm both sides
                    http.post(f"/v1/models/{MODEL_ID}/predict",
                              files={"files": ("a.png", png)}).raise_for_status()
                bare, over_http = latency(http, engines[policies[policy]], png, image,
                                          args.repeats)
            overheads[policy] = statistics.median(over_http) - statistics.median(bare)
        for _ in range(args.rounds):  # alternating blocks: drifting load hits each alike
            for policy, (_, url) in servers.items():
                img_s, cpu_share = asyncio.run(http_throughput(
                    url, key.headers, png, 16, args.seconds / args.rounds))
                rates.setdefault(policy, []).append(img_s)
                client_cpu.append(cpu_share)
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(30)
    for policy, engine in policies.items():
        http_img_s = statistics.median(rates[policy])
        best = max(limits[(engine, 1)], limits[(engine, 16)])
        in_lanes_best = max(lanes[(engine, size)] for size in LANE_SIZES)
        print(f"predict_serving policy={policy} engine={engine} http_img_s={http_img_s:.1f} "
              f"inprocess_batch16_img_s={limits[(engine, 16)]:.1f} "
              f"ratio={http_img_s / limits[(engine, 16)]:.3f} target_ratio=0.8 "
              f"ratio_to_best_inprocess={http_img_s / best:.3f} "
              f"ratio_to_lanes={http_img_s / in_lanes_best:.3f} "
              f"overhead_p50_ms={overheads[policy]:.2f} target_overhead_p50_ms=5 clients=16")
    print(f"predict_clients cpu_share_median={statistics.median(client_cpu):.3f} "
          f"cores={os.cpu_count()} (the 16 clients' CPU while measured, of all cores)")
    auto = statistics.median(rates["auto"])
    for name in ("torch-one-lane", "torch"):
        plain = statistics.median(rates[name])
        print(f"predict_auto_vs_torch against={name} ratio={auto / plain:.3f} "
              f"auto_img_s={auto:.1f} torch_img_s={plain:.1f} target=1.5")


def report_int8(report: dict) -> None:
    onnx, int8 = report["onnx"], report["int8"]
    print(f"predict_parity passed={onnx['passed']} images={onnx.get('images')} "
          f"agreement={onnx.get('agreement')} max_prob_diff={onnx.get('max_prob_diff')}")
    if "quality" in int8:
        drop = 100 * (int8["fp32_quality"] - int8["quality"])
        print(f"predict_int8 offered={int8['offered']} images={int8['images']} "
              f"fp32_accuracy={int8['fp32_quality']:.4f} int8_accuracy={int8['quality']:.4f} "
              f"drop_points={drop:.2f} agreement={int8['agreement']:.4f} "
              f"target_drop_points=0.5")
    else:
        print(f"predict_int8 offered=False why={int8['why']!r}")
    for name, engine in (("onnx", "onnxruntime"), ("int8", "onnxruntime-int8")):
        if report[name].get("batch"):
            batch = report[name]["batch"]
            print(f"predict_batch engine={engine} served_at={batch['size']} "
                  f"provider={batch['provider']} images_per_s={batch['images_per_s']}")


def report_lanes(lanes: dict[tuple[str, int], float], layout: LaneLayout) -> None:
    for (engine, batch), img_s in sorted(lanes.items()):
        print(f"predict_lanes engine={engine} lanes={layout.lanes} threads={layout.threads} "
              f"batch={batch} img_s={img_s:.1f}")


def report_in_process(limits: dict[tuple[str, int], float], size: int) -> None:
    for (engine, batch), img_s in sorted(limits.items()):
        print(f"predict_inprocess engine={engine} batch={batch} img_s={img_s:.1f} "
              f"vs_torch={img_s / limits[('torch', batch)]:.2f} image_size={size}")


if __name__ == "__main__":
    main()
