"""Memory (RSS) and open descriptors of the API and the workers, sampled from /proc, and
whether they stay flat: a least-squares slope fitted after the warm-up.

Processes are restarted by the faults, so each (role, pid) is its own series; the slope is
fitted over all of them with one intercept per process (a restart's fresh start is not a
leak, and does not hide one), and each process's first ``PROCESS_WARM_UP_S`` are left out.
The fault schedule spares the first worker, so one series spans the whole run.

Memory a process holds in a cache with a bound of its own (the API's loaded models, up to
``FTUNE_PREDICTOR_CACHE_MB``) is growth until the cache is full, not a leak: the judged slope
is of RSS less what the process reports it holds there (its raw RSS slope is reported too).
A leak in eviction still shows, since memory an evicted model leaves behind is no longer
reported as held."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

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
    held_mb: float = 0.0  # in a cache with a bound of its own, as the process reports it


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


def model_cache_mb(api_url: str, operator_key: str) -> float | None:
    """The API's loaded models' memory from its /metrics; None when it cannot say now (a
    fault may be under way: the sample is skipped rather than misread)."""
    try:
        response = httpx.get(f"{api_url}/metrics", timeout=2,
                             headers={"Authorization": f"Bearer {operator_key}"})
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    for line in response.text.splitlines():
        if line.startswith("ftune_model_cache_bytes "):
            return float(line.split()[1]) / 2**20
    return None


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
    rss_mb_per_h: float | None  # raw
    unheld_mb_per_h: float | None  # RSS less bounded caches: the one judged
    fds_per_h: float | None
    samples: int


class ResourceSampler(threading.Thread):
    """Samples every process ``pids()`` names (``api`` or a worker's name -> pid);
    ``held(role)`` is the MB a process of that role holds in bounded caches (None: unknown
    now, the sample is skipped)."""

    def __init__(self, pids: Callable[[], dict[str, int]], halt: threading.Event,
                 held: Callable[[str], float | None] = lambda _role: 0.0,
                 interval_s: float = 2.0) -> None:
        super().__init__(name="soak-resources", daemon=True)
        self.pids, self.halt, self.held, self.interval_s = pids, halt, held, interval_s
        self.samples: list[Sample] = []

    def run(self) -> None:
        while not self.halt.wait(self.interval_s):
            for name, pid in self.pids().items():
                role = "api" if name == "api" else "worker"
                held = self.held(role)
                sample = read_sample(role, pid)
                if sample is not None and held is not None:
                    self.samples.append(dataclasses.replace(sample, held_mb=held))

    def slopes(self, role: str, after: float) -> Slopes:
        """Slopes of ``role``'s processes from samples taken after ``after`` (monotonic)."""
        rss: dict[int, list[tuple[float, float]]] = defaultdict(list)
        unheld: dict[int, list[tuple[float, float]]] = defaultdict(list)
        fds: dict[int, list[tuple[float, float]]] = defaultdict(list)
        samples = list(self.samples)
        first: dict[int, float] = {}
        for sample in samples:
            first.setdefault(sample.pid, sample.at)
        chosen = [s for s in samples if s.role == role and s.at >= after
                  and s.at >= first[s.pid] + PROCESS_WARM_UP_S]
        for sample in chosen:
            rss[sample.pid].append((sample.at, sample.rss_mb))
            unheld[sample.pid].append((sample.at, sample.rss_mb - sample.held_mb))
            fds[sample.pid].append((sample.at, float(sample.fds)))
        long = {pid for pid, points in rss.items()
                if points[-1][0] - points[0][0] >= LONG_SERIES_S}
        if long:
            rss = {pid: points for pid, points in rss.items() if pid in long}
            unheld = {pid: points for pid, points in unheld.items() if pid in long}
            fds = {pid: points for pid, points in fds.items() if pid in long}
            chosen = [s for s in chosen if s.pid in long]
        rss_slope, fds_slope = pooled_slope(rss), pooled_slope(fds)
        unheld_slope = pooled_slope(unheld)
        return Slopes(rss_mb_per_h=None if rss_slope is None else rss_slope * HOUR,
                      unheld_mb_per_h=None if unheld_slope is None else unheld_slope * HOUR,
                      fds_per_h=None if fds_slope is None else fds_slope * HOUR,
                      samples=len(chosen))
