"""Memory (RSS) and open descriptors of the API and the workers, sampled from /proc, and
whether they stay flat: a least-squares slope fitted after the warm-up.

Processes are restarted by the faults, so each (role, pid) is its own series; the slope is
fitted over all of them with one intercept per process (a restart's fresh start is not a
leak, and does not hide one), and each process's first ``PROCESS_WARM_UP_S`` are left out.
The fault schedule spares the first worker, so one series spans the whole run."""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HOUR = 3600.0
# Each process's own warm-up (imports, caches filling, the first models loaded) is growth,
# not a leak: its first samples are left out of the fit.
PROCESS_WARM_UP_S = 90.0
# Series at least this long after their warm-up are the ones judged, where there are any: a
# process restarted every two minutes shows its warm-up in its short series.
LONG_SERIES_S = 300.0


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    role: str  # "api" or "worker"
    pid: int
    rss_mb: float
    fds: int


def read_sample(role: str, pid: int) -> Sample | None:
    """None when the process has gone (a fault killed it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rss_kb = next((int(line.split()[1]) for line in status.splitlines()
                   if line.startswith("VmRSS:")), 0)
    return Sample(time.monotonic(), role, pid, rss_kb / 1024, fds)


def pooled_slope(series: dict[int, list[tuple[float, float]]]) -> float | None:
    """The least-squares slope (per second) of y on t, one intercept per series; None with
    too little data."""
    num = den = 0.0
    for points in series.values():
        if len(points) < 3:
            continue
        mean_t = sum(t for t, _ in points) / len(points)
        mean_y = sum(y for _, y in points) / len(points)
        num += sum((t - mean_t) * (y - mean_y) for t, y in points)
        den += sum((t - mean_t) ** 2 for t, _ in points)
    return num / den if den > 0 else None


@dataclass
class Slopes:
    rss_mb_per_h: float | None
    fds_per_h: float | None
    samples: int


class ResourceSampler(threading.Thread):
    """Samples every process ``pids()`` names (``api`` or a worker's name -> pid)."""

    def __init__(self, pids: Callable[[], dict[str, int]], halt: threading.Event,
                 interval_s: float = 2.0) -> None:
        super().__init__(name="soak-resources", daemon=True)
        self.pids, self.halt, self.interval_s = pids, halt, interval_s
        self.samples: list[Sample] = []

    def run(self) -> None:
        while not self.halt.wait(self.interval_s):
            for name, pid in self.pids().items():
                sample = read_sample("api" if name == "api" else "worker", pid)
                if sample is not None:
                    self.samples.append(sample)

    def slopes(self, role: str, after: float) -> Slopes:
        """Slopes of ``role``'s processes from samples taken after ``after`` (monotonic)."""
        rss: dict[int, list[tuple[float, float]]] = defaultdict(list)
        fds: dict[int, list[tuple[float, float]]] = defaultdict(list)
        samples = list(self.samples)
        first: dict[int, float] = {}
        for sample in samples:
            first.setdefault(sample.pid, sample.at)
        chosen = [s for s in samples if s.role == role and s.at >= after
                  and s.at >= first[s.pid] + PROCESS_WARM_UP_S]
        for sample in chosen:
            rss[sample.pid].append((sample.at, sample.rss_mb))
            fds[sample.pid].append((sample.at, float(sample.fds)))
        long = {pid for pid, points in rss.items()
                if points[-1][0] - points[0][0] >= LONG_SERIES_S}
        if long:
            rss = {pid: points for pid, points in rss.items() if pid in long}
            fds = {pid: points for pid, points in fds.items() if pid in long}
            chosen = [s for s in chosen if s.pid in long]
        rss_slope, fds_slope = pooled_slope(rss), pooled_slope(fds)
        return Slopes(rss_mb_per_h=None if rss_slope is None else rss_slope * HOUR,
                      fds_per_h=None if fds_slope is None else fds_slope * HOUR,
                      samples=len(chosen))
