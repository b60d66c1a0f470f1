"""The soak's summary: requests by route and status, faults by kind, jobs by final state,
invariant violations, memory and descriptor slopes, and the latency of GET /v1/jobs/{id}
outside and during faults; then one line with the numbers that matter."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from ftune.testing.soak.journal import Journal
from ftune.testing.soak.resources import Slopes

JOB_ROUTE = "GET /v1/jobs/{id}"


@dataclass
class SoakResult:
    minutes: float
    seed: int
    database: str
    journal: Journal
    jobs_by_state: Counter[str]
    slopes: dict[str, Slopes]  # "api", "worker"
    slopes_judged: bool  # the run was long enough for the bounds to apply
    harness_errors: list[str]
    revived: list[str]  # processes that exited by themselves (restarted, as a supervisor would)

    @property
    def violations(self) -> list:
        return self.journal.violations

    @property
    def requests(self) -> int:
        return len(self.journal.calls)

    def latencies(self, during_fault: bool) -> list[float]:
        return sorted(c.ms for c in self.journal.calls if f"{c.method} {c.route}" == JOB_ROUTE
                      and c.status and c.during_fault == during_fault)


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile of sorted ``values``."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary(result: SoakResult) -> str:
    lines = [f"soak of {result.minutes:g} min, seed {result.seed}, {result.database}",
             "requests by route and status:"]
    by_route: dict[str, Counter[int]] = defaultdict(Counter)
    for (route, status), count in result.journal.by_route().items():
        by_route[route][status] += count
    for route in sorted(by_route):
        statuses = ", ".join(f"{s or 'no answer'}: {n}" for s, n in sorted(by_route[route].items()))
        lines.append(f"  {route:45s} {statuses}")
    lines.append("faults injected: " + (", ".join(
        f"{kind} {n}" for kind, n in sorted(result.journal.faults_by_kind().items())) or "none"))
    for window in result.journal.faults:
        lines.append(f"  t={window.start - result.journal.started:6.1f}s {window.kind}: "
                     f"{window.detail}")
    lines.append("jobs by final state: " + ", ".join(
        f"{state} {n}" for state, n in sorted(result.jobs_by_state.items())))
    for role, slopes in sorted(result.slopes.items()):
        lines.append(f"{role}: RSS {_fmt(slopes.rss_mb_per_h)} MB/h, less bounded caches "
                     f"{_fmt(slopes.unheld_mb_per_h)} MB/h (judged), descriptors "
                     f"{_fmt(slopes.fds_per_h)}/h over {slopes.samples} samples after warm-up"
                     f"{'' if result.slopes_judged else ' (too short a run to judge)'}")
    for label, during in (("outside faults", False), ("during faults", True)):
        values = result.latencies(during)
        lines.append(f"{JOB_ROUTE} {label}: p50 {_fmt(percentile(values, 50), 0)} ms, p99 "
                     f"{_fmt(percentile(values, 99), 0)} ms ({len(values)} requests)")
    lines += [f"exited by itself (restarted): {what}" for what in result.revived]
    lines += [f"harness error: {error}" for error in result.harness_errors]
    lines.append(f"invariant violations: {len(result.violations)} (target 0)")
    lines += [v.render() for v in result.violations]
    return "\n".join(lines)


def final_line(result: SoakResult) -> str:
    outside = result.latencies(False)
    worst = {name: max((getattr(s, name) or 0.0 for s in result.slopes.values()), default=0.0)
             for name in ("unheld_mb_per_h", "rss_mb_per_h", "fds_per_h")}
    return (f"soak minutes={result.minutes:g} seed={result.seed} requests={result.requests} "
            f"violations={len(result.violations)} jobs={sum(result.jobs_by_state.values())} "
            f"faults={sum(result.journal.faults_by_kind().values())} "
            f"mem_slope_mb_per_h={worst['unheld_mb_per_h']:.1f} "
            f"raw_rss_slope_mb_per_h={worst['rss_mb_per_h']:.1f} "
            f"fd_slope_per_h={worst['fds_per_h']:.1f} "
            f"p50_ms={_fmt(percentile(outside, 50), 0)} p99_ms={_fmt(percentile(outside, 99), 0)}")
