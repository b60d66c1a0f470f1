"""The batch size an engine runs fastest at on this host: ONNX Runtime's measured once per
model (in its serving preparation), torch's once per architecture and input size in each API
process.

On a CPU, a larger batch is not faster per image: lite0 at 224 px ran ONNX Runtime at 165
images/s at batch 4 and 153 at batch 16, eager torch at 94 at batch 8 and 67 at batch 16
(bench/predict.py's model, in process), since a batch's activations outgrow the caches. So
the dynamic batcher gathers at most that many images into one forward (answering them as
soon as it ends), and a request with more runs in chunks of it. On a GPU the measurement
finds the large batches; a size is used only with the execution provider it was measured
with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ftune.models.predictor import Predictor

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


def measure_torch_batch_sizes(predictor: Predictor, rounds: int = ROUNDS,
                              block_s: float = BLOCK_S) -> dict:
    """``measure_batch_sizes`` for the predictor's torch model (on noise: the speed of a
    forward does not depend on what the image shows). Call it on the thread that runs the
    forwards: its thread count is theirs."""
    import torch

    side = predictor.preprocessing.input_size
    image = np.random.default_rng(0).integers(0, 256, (1, 3, side, side), dtype=np.uint8)
    return measure_batch_sizes(lambda batch: predictor.probabilities(torch.from_numpy(batch)),
                               image, f"torch-{predictor.device.type}", rounds=rounds,
                               block_s=block_s)


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
