"""Event streams of one API process: admitted under limits, woken by one shared poller.

Each open stream used to poll the database twice a second through the thread pool, so
enough streams took every pooled connection. Now one poller per process asks the database,
a few times a second and in one cheap query, which jobs (or sweeps: their events share the
table) have new events of any kind (``EventKind``), and wakes only the streams watching
those ids; a woken stream then reads its own events once. A stream also
wakes every ``RECHECK_S`` to check its key (a revoked key ends it) and reads anyway every
``SAFETY_READ_S``, which catches events committed out of id order.

Streams are capped per key, per tenant (the keys of one tenant together, so making more keys
does not multiply the key's cap) and per process: over the key's or the tenant's cap is a 429,
over the process's a 503, all with ``Retry-After``. The caps are per process, as what a
stream holds (a connection, a task, its memory) is the process's; several API processes
each keep their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from ftune.service.db.session import Database
from ftune.service.db.tables import JobEvent
from ftune.service.errors import TooManyRequests, Unavailable

log = logging.getLogger(__name__)

POLL_S = 0.5
RECHECK_S = 1.0
SAFETY_READ_S = 10.0
RETRY_AFTER_S = 10


class StreamHub:
    def __init__(self, db: Database, *, max_streams: int, max_per_key: int,
                 max_per_tenant: int | None = None) -> None:
        self.db, self.max_streams, self.max_per_key = db, max_streams, max_per_key
        self.max_per_tenant = max_per_tenant or max_streams
        self._open: Counter[str] = Counter()  # key id -> open streams
        self._by_tenant: Counter[str] = Counter()  # tenant id -> open streams
        self._watchers: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._seen_id: int | None = None  # newest event id the poller has looked at

    @property
    def open_streams(self) -> int:
        return sum(self._open.values())

    def admit(self, key_id: str, tenant_id: str | None = None) -> Callable[[], None]:
        """Take one of the key's, one of its tenant's and one of the process's stream slots;
        returns the function that gives them back (safe to call more than once)."""
        if self._open[key_id] >= self.max_per_key:
            raise TooManyRequests(f"this key already has {self._open[key_id]} event streams "
                                  f"open (FTUNE_MAX_STREAMS_PER_KEY); close one first",
                                  retry_after_s=RETRY_AFTER_S)
        tenant = tenant_id or ""
        if tenant_id is not None and self._by_tenant[tenant] >= self.max_per_tenant:
            raise TooManyRequests(f"this tenant's keys already have {self._by_tenant[tenant]} "
                                  "event streams open on this server "
                                  "(FTUNE_MAX_STREAMS_PER_TENANT); close one first",
                                  retry_after_s=RETRY_AFTER_S)
        if self.open_streams >= self.max_streams:
            raise Unavailable("this server has as many event streams open as it allows "
                              "(FTUNE_MAX_STREAMS); poll GET /v1/jobs/{id} or try again later",
                              retry_after_s=RETRY_AFTER_S)
        self._open[key_id] += 1
        self._by_tenant[tenant] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                _give_back(self._open, key_id)
                _give_back(self._by_tenant, tenant)

        return release

    @contextmanager
    def watching(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event the poller sets when ``job_id`` has new events; the caller clears it."""
        woken = asyncio.Event()
        self._watchers[job_id].add(woken)
        try:
            yield woken
        finally:
            self._watchers[job_id].discard(woken)
            if not self._watchers[job_id]:
                del self._watchers[job_id]

    async def run(self) -> None:
        """The poller: runs for the life of the process."""
        while True:
            if self._watchers:
                try:
                    news = await run_in_threadpool(self._jobs_with_news)
                    self._wake(list(self._watchers) if news is None else news)
                except Exception as exc:  # the DB down or busy: streams still recheck alone
                    log.warning("event poller skipped a round: %s", exc)
            await asyncio.sleep(POLL_S)

    def _jobs_with_news(self) -> list[str] | None:
        """Jobs with events newer than the last look; None on the first look (wake all)."""
        with self.db.session() as session:
            if self._seen_id is None:
                self._seen_id = session.scalar(select(func.max(JobEvent.id))) or 0
                return None
            rows = session.execute(select(JobEvent.job_id, func.max(JobEvent.id))
                                   .where(JobEvent.id > self._seen_id)
                                   .group_by(JobEvent.job_id)).all()
        for _, newest in rows:
            self._seen_id = max(self._seen_id, newest)
        return [job_id for job_id, _ in rows]

    def _wake(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            for woken in self._watchers.get(job_id, ()):
                woken.set()


def _give_back(counts: Counter[str], name: str) -> None:
    counts[name] -= 1
    if counts[name] <= 0:
        del counts[name]
