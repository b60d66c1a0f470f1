"""Learning-rate schedules as a pure function of the step, with linear warmup.

A plain function (rather than a torch LR scheduler) keeps working when parameter groups join
the optimizer mid-run, and its only state is the step number.
"""

from __future__ import annotations

import math

_ONECYCLE_PEAK_AT = 0.3
_ONECYCLE_START = 1 / 25
_ONECYCLE_END = 1 / 25e4


def lr_multiplier(name: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Factor on each group's base lr at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if name == "constant":
        return 1.0
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "step":
        return 0.1 ** min(2, math.floor(progress * 3))  # ×0.1 after each third
    if name == "onecycle":
        if progress < _ONECYCLE_PEAK_AT:
            return _cos_between(_ONECYCLE_START, 1.0, progress / _ONECYCLE_PEAK_AT)
        return _cos_between(1.0, _ONECYCLE_END,
                            (progress - _ONECYCLE_PEAK_AT) / (1 - _ONECYCLE_PEAK_AT))
    raise ValueError(f"unknown schedule {name!r}")


def _cos_between(start: float, end: float, t: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
