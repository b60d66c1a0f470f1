"""What happened during a soak: every request's outcome, every fault's window, and the recent
operations that each invariant violation is printed with (so it can be understood and, with
the seed, reproduced)."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

CONTEXT = 30  # operations and faults printed before each violation
RECOVERY_S = 15.0  # after a fault ends, clients may still meet its effects this long


@dataclass(frozen=True)
class Call:
    at: float  # time.monotonic()
    actor: str
    method: str
    route: str  # the path template, e.g. GET /v1/jobs/{id}
    status: int  # 0: no answer (connection refused or cut, timed out)
    ms: float
    during_fault: bool


@dataclass
class FaultWindow:
    kind: str
    start: float
    end: float | None = None  # None while it lasts
    detail: str = ""

    def covers(self, at: float, slack_s: float = RECOVERY_S) -> bool:
        end = time.monotonic() if self.end is None else self.end
        return self.start - 1.0 <= at <= end + slack_s


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str
    seed: int
    context: tuple[str, ...]  # the last operations and faults before it

    def render(self) -> str:
        lines = [f"VIOLATION {self.invariant}: {self.detail}",
                 f"  reproduce with --seed {self.seed}; the last {len(self.context)} "
                 "operations and faults before it:"]
        return "\n".join(lines + [f"    {line}" for line in self.context])


@dataclass
class Journal:
    seed: int
    started: float = field(default_factory=time.monotonic)
    calls: list[Call] = field(default_factory=list)
    faults: list[FaultWindow] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    # Whether the data disk is below the API's reserve now, whatever filled it (the fault's
    # ballast, or another process on the machine): a 507 then is the right answer.
    disk_low: Callable[[], bool] = lambda: False
    _recent: deque[str] = field(default_factory=lambda: deque(maxlen=CONTEXT))
    _seen: set[tuple[str, str]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, actor: str, text: str) -> None:
        with self._lock:
            self._recent.append(f"t={time.monotonic() - self.started:7.1f}s {actor}: {text}")

    def record(self, call: Call, text: str) -> None:
        with self._lock:
            self.calls.append(call)
        self.note(call.actor, f"{text} -> {call.status or 'no answer'} ({call.ms:.0f} ms)")

    def fault_started(self, kind: str, detail: str = "") -> FaultWindow:
        window = FaultWindow(kind, time.monotonic(), detail=detail)
        with self._lock:
            self.faults.append(window)
        self.note("faults", f"{kind} begins {detail}".rstrip())
        return window

    def fault_ended(self, window: FaultWindow) -> None:
        window.end = time.monotonic()
        self.note("faults", f"{window.kind} ends after {window.end - window.start:.1f} s")

    def faults_at(self, at: float, slack_s: float = RECOVERY_S) -> set[str]:
        """The kinds of fault whose window (with ``slack_s`` of recovery) covers ``at``."""
        with self._lock:
            return {w.kind for w in self.faults if w.covers(at, slack_s)}

    def violate(self, invariant: str, detail: str, *, key: str | None = None) -> None:
        """Record a violation (once per ``invariant`` and ``key``: a checker that runs again
        reports a lasting problem once)."""
        with self._lock:
            if key is not None:
                if (invariant, key) in self._seen:
                    return
                self._seen.add((invariant, key))
            self.violations.append(Violation(invariant, detail, self.seed, tuple(self._recent)))

    # -- summaries --------------------------------------------------------------------------
    def by_route(self) -> Counter[tuple[str, int]]:
        with self._lock:
            return Counter((f"{c.method} {c.route}", c.status) for c in self.calls)

    def faults_by_kind(self) -> Counter[str]:
        with self._lock:
            return Counter(w.kind for w in self.faults)
