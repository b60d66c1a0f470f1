"""Runs a soak: the stack, three tenants' workload, the operator, the faults, the resource
sampler and the checker together; then drains, checks once more and reports.

``with Soak(options) as soak: result = soak.run()``; the stack stays up until the ``with``
ends, so a test can plant a violation and check that the checker finds it."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import func, select

from ftune.service.db.tables import Job
from ftune.testing.soak.checker import TERMINAL, Checker
from ftune.testing.soak.data import build_data
from ftune.testing.soak.faults import FaultInjector, schedule
from ftune.testing.soak.journal import Journal
from ftune.testing.soak.operator import OperatorActor
from ftune.testing.soak.report import SoakResult
from ftune.testing.soak.resources import ResourceSampler, Slopes, model_cache_mb
from ftune.testing.soak.stack import SoakStack
from ftune.testing.soak.tenants import Tenants, TenantState
from ftune.testing.soak.workload import TenantActor

TENANTS = ("alpha", "bravo", "charlie")
# Leak bounds, judged on runs of at least JUDGE_AFTER_S after the warm-up: a shorter run's
# slope is mostly the noise of loading models and starting jobs.
RSS_BOUND_MB_PER_H = {"api": 150.0, "worker": 300.0}
FD_BOUND_PER_H = 30.0
JUDGE_AFTER_S = 600.0


@dataclass
class SoakOptions:
    work: Path
    minutes: float = 2.0
    seed: int = 0
    database: str = "sqlite"
    workers: int = 2
    check_every_s: float = 15.0
    drain_s: float = 150.0  # how long finished work may take to settle at the end


class Soak:
    def __init__(self, options: SoakOptions) -> None:
        self.options = options
        self.journal = Journal(options.seed)
        self.halt = threading.Event()

    def __enter__(self) -> Soak:
        self.options.work.mkdir(parents=True, exist_ok=True)
        self.data = build_data(self.options.work / "data")
        self.stack = SoakStack(self.options.work, self.options.database,
                               self.options.workers).__enter__()
        self.journal.disk_low = self.stack.disk_low
        try:
            self.tenants = Tenants([self._tenant(name) for name in TENANTS])
            self.checker = Checker(self.stack.database_url, self.stack.home / "blobs",
                                   self.journal, self.tenants)
        except BaseException:
            self.stack.__exit__()
            raise
        return self

    def _tenant(self, name: str) -> TenantState:
        key = self.stack.key(name).key
        usage = httpx.get(f"{self.stack.api_url}/v1/usage", timeout=30,
                          headers={"Authorization": f"Bearer {key}"})
        usage.raise_for_status()
        return TenantState(name, usage.json()["tenant_id"], key)

    def __exit__(self, *_: object) -> None:
        self.halt.set()
        self.checker.close()
        self.stack.__exit__()

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> SoakResult:
        options, duration = self.options, self.options.minutes * 60
        self.journal.started = time.monotonic()  # times in the report count from here
        actors = [TenantActor(state, self.tenants, self.stack.api_url, self.data, self.journal,
                              options.seed, self.halt) for state in self.tenants.states]
        operator = OperatorActor(self.tenants, self.stack.api_url, self.stack.operator.key,
                                 self.journal, options.seed, self.halt)
        faults = FaultInjector(self.stack, self.journal, schedule(options.seed, duration),
                               options.seed, self.halt)
        sampler = ResourceSampler(self.stack.pids, self.halt, self._held_mb)
        threads = [*actors, operator, faults, sampler]
        for thread in threads:
            thread.start()
        began = time.monotonic()
        while not self.halt.wait(min(options.check_every_s, max(0.0, began + duration
                                                                 - time.monotonic()))):
            if time.monotonic() >= began + duration:
                break
            self._check(final=False)
        self.halt.set()
        for thread in threads:
            thread.join(timeout=300)
        errors = [e for actor in actors for e in actor.errors] + operator.errors + faults.errors
        self.revived = [*faults.revived, *self.stack.revive()]
        self.stack.wait_ready()
        self._settle()
        if (failed := self._check(final=True)) is not None:
            errors.append(f"the final check failed: {failed}")
        return self._result(sampler, began, errors)

    def _held_mb(self, role: str) -> float | None:
        if role != "api":
            return 0.0
        return model_cache_mb(self.stack.api_url, self.stack.operator.key)

    def _check(self, *, final: bool) -> str | None:
        """Runs the checker; why it could not finish (a fault, such as the database
        restarting, may cut a check short during the run; at the end nothing may)."""
        try:
            self.checker.check(final=final, api_url=self.stack.api_url)
        except Exception as exc:
            self.journal.note("checker", f"check cut short: {exc!r}")
            return repr(exc)
        return None

    def _settle(self) -> None:
        """Until every accepted job has finished (or the drain time is up), then the grace a
        deletion needs, so the final check sees a quiet service."""
        deadline = time.monotonic() + self.options.drain_s
        while time.monotonic() < deadline and self._unfinished():
            time.sleep(2)
        time.sleep(self.checker.grace_s + 2)

    def _unfinished(self) -> int:
        with self.checker.engine.connect() as db:
            return int(db.scalar(select(func.count()).select_from(Job).where(
                Job.status.not_in(TERMINAL))) or 0)

    def _result(self, sampler: ResourceSampler, began: float, errors: list[str]) -> SoakResult:
        duration = self.options.minutes * 60
        warm_up = began + min(300.0, duration / 4)
        slopes = {role: sampler.slopes(role, warm_up) for role in ("api", "worker")}
        judged = duration - (warm_up - began) >= JUDGE_AFTER_S
        if judged:
            self._judge_slopes(slopes)
        with self.checker.engine.connect() as db:
            states = Counter(dict(db.execute(select(Job.status, func.count()).group_by(
                Job.status)).all()))
        return SoakResult(self.options.minutes, self.options.seed, self.options.database,
                          self.journal, states, slopes, judged, errors, self.revived)

    def _judge_slopes(self, slopes: dict[str, Slopes]) -> None:
        for role, found in slopes.items():
            grows = found.unheld_mb_per_h
            if grows is not None and grows > RSS_BOUND_MB_PER_H[role]:
                self.journal.violate("memory stays flat", f"{role} RSS less its bounded "
                                     f"caches grows {grows:.0f} MB/h (bound "
                                     f"{RSS_BOUND_MB_PER_H[role]:.0f})", key=f"rss:{role}")
            if found.fds_per_h is not None and found.fds_per_h > FD_BOUND_PER_H:
                self.journal.violate("descriptors stay flat", f"{role} opens "
                                     f"{found.fds_per_h:.0f} more descriptors an hour (bound "
                                     f"{FD_BOUND_PER_H:.0f})", key=f"fds:{role}")
