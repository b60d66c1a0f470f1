"""The batch size ONNX Runtime runs fastest at on this host, measured once per model.

On a CPU, a larger batch is not faster per image: lite0 at 224 px ran 262 images/s at batch 1
and 217 at batch 16 (bench/predict.py), since a batch's activations outgrow the caches. So
the dynamic batcher still gathers every waiting request into one forward, and the runner
splits it into chunks of the size measured here. On a GPU the measurement finds the large
batches; a chunk size is used only with the execution provider it was measured with.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

BATCH_SIZES = (1, 2, 4, 8, 16)
ROUNDS = 3  # alternating blocks: drifting load hits every size alike
BLOCK_S = 0.15  # per size and round: the whole measurement takes about 2 s
# A larger size must beat the smallest by this much: within noise, small batches keep latency.
MIN_GAIN = 1.05


def measure_batch_sizes(run: Callable[[np.ndarray], object], image: np.ndarray, provider: str,
                        sizes: tuple[int, ...] = BATCH_SIZES, rounds: int = ROUNDS,
                        block_s: float = BLOCK_S) -> dict:
    """Images per second of ``run`` at each size (``image``: one uint8 ``[1, 3, S, S]``),
    the median of ``rounds`` alternating blocks, and the size to serve with:
    ``{"size": n, "provider": provider, "images_per_s": {"1": r1, ...}}``."""
    samples: dict[int, list[float]] = {size: [] for size in sizes}
    batches = {size: np.repeat(image, size, axis=0) for size in sizes}
    for size in sizes:
        run(batches[size])  # warm: first runs allocate
    for _ in range(rounds):
        for size in sizes:
            samples[size].append(images_per_second(run, batches[size], block_s))
    rates = {size: float(np.median(values)) for size, values in samples.items()}
    return {"size": choose_size(rates), "provider": provider,
            "images_per_s": {str(size): round(rate, 1) for size, rate in rates.items()}}


def images_per_second(run: Callable[[np.ndarray], object], batch: np.ndarray,
                      seconds: float) -> float:
    """Images per second of ``run`` over about ``seconds`` of runs of ``batch`` (one at
    least)."""
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or not done:
        run(batch)
        done += len(batch)
    return done / (time.perf_counter() - started)


def choose_size(rates: dict[int, float]) -> int:
    """The fastest size, unless it is within MIN_GAIN of the smallest size's rate."""
    smallest = min(rates)
    fastest = max(rates, key=lambda size: rates[size])
    return fastest if rates[fastest] >= MIN_GAIN * rates[smallest] else smallest
