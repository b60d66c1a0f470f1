"""The batch size an engine runs fastest at on this host, with its forwards side by side in
the host's lanes (lanes.py): ONNX Runtime's measured once per model (in its serving
preparation), torch's once per architecture and input size in each API process.

On a CPU, a larger batch is not faster per image: lite0 at 224 px ran ONNX Runtime at 165
images/s at batch 4 and 153 at batch 16, eager torch at 94 at batch 8 and 67 at batch 16
(bench/predict.py's model, in process, one forward at a time), since a batch's activations
outgrow the caches. So the dynamic batcher gathers at most that many images into one forward
(answering them as soon as it ends), and a request with more runs in chunks of it. On a GPU
the measurement finds the large batches; a size is used only with the execution provider and
the lanes it was measured with.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from ftune.models.serving.lanes import LaneLayout

if TYPE_CHECKING:
    from ftune.models.predictor import Predictor
    from ftune.models.serving.onnx_runner import OnnxRunner

# A forward: uint8 [N, 3, S, S] images and the threads it may use -> probabilities.
Forward = Callable[[np.ndarray, int], object]

BATCH_SIZES = (1, 2, 4, 8, 16)
ROUNDS = 3  # alternating blocks: drifting load hits every size alike
BLOCK_S = 0.15  # per size and round: the whole measurement takes about 2 s
BLOCK_RUNS = 32  # or this many forwards per lane, if sooner: a small model's takes far less
# A larger size must beat the smallest by this much: within noise, small batches keep latency.
MIN_GAIN = 1.05


def measure_batch_sizes(run: Forward, image: np.ndarray, provider: str, layout: LaneLayout,
                        sizes: tuple[int, ...] = BATCH_SIZES, rounds: int = ROUNDS,
                        block_s: float = BLOCK_S) -> dict:
    """Images per second of ``run`` at each size in ``layout``'s lanes, all busy at once
    (``image``: one uint8 ``[1, 3, S, S]``), the median of ``rounds`` alternating blocks,
    and the size to serve with: ``{"size": n, "provider": provider, "lanes": l,
    "threads": t, "images_per_s": {"1": r1, ...}}``."""
    samples: dict[int, list[float]] = {size: [] for size in sizes}
    batches = {size: np.repeat(image, size, axis=0) for size in sizes}
    with ThreadPoolExecutor(layout.lanes, thread_name_prefix="measure") as pool:
        for size in sizes:  # warm: first runs allocate, in each lane
            in_lanes(pool, run, batches[size], layout, 0.0)
        for _ in range(rounds):
            for size in sizes:
                samples[size].append(in_lanes(pool, run, batches[size], layout, block_s,
                                              BLOCK_RUNS))
    rates = {size: float(np.median(values)) for size, values in samples.items()}
    return {"size": choose_size(rates), "provider": provider, **layout.describe(),
            "images_per_s": {str(size): round(rate, 1) for size, rate in rates.items()}}


def in_lanes(pool: ThreadPoolExecutor, run: Forward, batch: np.ndarray, layout: LaneLayout,
             seconds: float, max_runs: int | None = None) -> float:
    """Images per second of ``layout.lanes`` threads running ``batch`` side by side for about
    ``seconds`` or ``max_runs`` runs each (``pool``: that many threads)."""
    together = threading.Barrier(layout.lanes)

    def lane() -> float:
        together.wait()
        return images_per_second(lambda b: run(b, layout.threads), batch, seconds, max_runs)

    return sum(f.result() for f in [pool.submit(lane) for _ in range(layout.lanes)])


def measure_model_batch_sizes(predictor: Predictor, layout: LaneLayout,
                              runner: OnnxRunner | None = None, rounds: int = ROUNDS,
                              block_s: float = BLOCK_S) -> dict:
    """``measure_batch_sizes`` for the predictor's architecture, on noise (the speed of a
    forward does not depend on what the image shows): by ``runner``, or by the predictor's
    torch model."""
    import torch

    def by_torch(batch: np.ndarray, threads: int) -> object:
        return predictor.probabilities(torch.from_numpy(batch), threads)

    side = predictor.preprocessing.input_size
    image = np.random.default_rng(0).integers(0, 256, (1, 3, side, side), dtype=np.uint8)
    return measure_batch_sizes(by_torch if runner is None else runner, image,
                               provider_of(predictor, runner), layout, rounds=rounds,
                               block_s=block_s)


def provider_of(predictor: Predictor, runner: OnnxRunner | None) -> str:
    """What a measured size holds for: the ONNX Runtime session's execution provider, or
    torch on the predictor's device."""
    return runner.providers[0] if runner is not None else f"torch-{predictor.device.type}"


def images_per_second(run: Callable[[np.ndarray], object], batch: np.ndarray,
                      seconds: float, max_runs: int | None = None) -> float:
    """Images per second of ``run`` over about ``seconds`` of runs of ``batch``, or
    ``max_runs`` runs if sooner (one at least)."""
    runs, started = 0, time.perf_counter()
    while not runs or (time.perf_counter() - started < seconds
                       and (max_runs is None or runs < max_runs)):
        run(batch)
        runs += 1
    return runs * len(batch) / (time.perf_counter() - started)


def choose_size(rates: dict[int, float]) -> int:
    """The fastest size, unless it is within MIN_GAIN of the smallest size's rate."""
    smallest = min(rates)
    fastest = max(rates, key=lambda size: rates[size])
    return fastest if rates[fastest] >= MIN_GAIN * rates[smallest] else smallest
