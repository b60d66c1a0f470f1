"""What goes wrong, and when: a schedule drawn from the seed (every kind of fault once per
round, rounds spread over the run) and the thread that injects it into the stack."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ftune.testing.soak.journal import Journal
from ftune.testing.soak.stack import SoakStack

FAULT_KINDS = ("worker_kill", "api_restart", "redis_restart", "database", "disk_full",
               "slow_clients")
ROUND_S = 120.0  # one round of every kind per this long (the short soak is one round)
WARM_UP_S = 12.0  # the workload gets going before the first fault
# A long run restarts the API only in its first two thirds: one API process then lives the
# last third, long enough for its memory slope to mean something (a series of the ~30 s a
# restarted process lives past its warm-up measures its warm-up, not a leak).
API_STEADY_SHARE, API_STEADY_FROM_ROUNDS = 1 / 3, 6
SLOW_CLIENTS = 40  # connections a slow client holds open, sending headers a byte at a time


@dataclass(frozen=True)
class Fault:
    at_s: float  # after the start of the workload
    kind: str
    hold_s: float  # how long it lasts before the stack is made whole again


def schedule(seed: int, duration_s: float) -> list[Fault]:
    """Every kind once per round (the API's restart not in a long run's last third), in an
    order and at times drawn from ``seed``; the last fault ends well before ``duration_s``
    so the run can settle."""
    rng = random.Random(f"faults-{seed}")
    span = max(30.0, duration_s - WARM_UP_S - 20.0)
    rounds = max(1, round(span / ROUND_S))
    slot = span / (rounds * len(FAULT_KINDS))
    faults: list[Fault] = []
    steady_from = (rounds - round(rounds * API_STEADY_SHARE)
                   if rounds >= API_STEADY_FROM_ROUNDS else rounds)
    for number in range(rounds):
        kinds = list(FAULT_KINDS)
        rng.shuffle(kinds)
        if number >= steady_from:
            kinds.remove("api_restart")
        for index, kind in enumerate(kinds):
            start = WARM_UP_S + (number * len(kinds) + index) * slot
            faults.append(Fault(round(start + rng.uniform(0, 0.25 * slot), 1), kind,
                                round(rng.uniform(2.0, max(2.5, min(10.0, 0.4 * slot))), 1)))
    return faults


class FaultInjector(threading.Thread):
    """Injects ``faults`` into ``stack`` in order, each fault's window in the journal."""

    def __init__(self, stack: SoakStack, journal: Journal, faults: list[Fault], seed: int,
                 stop: threading.Event) -> None:
        super().__init__(name="soak-faults", daemon=True)
        self.stack, self.journal, self.faults, self.halt = stack, journal, faults, stop
        self.rng = random.Random(f"fault-targets-{seed}")
        self.errors: list[str] = []
        self.revived: list[str] = []  # processes that exited by themselves, restarted
        self.actions: dict[str, Callable[[Fault], str]] = {
            "worker_kill": self._kill_worker, "api_restart": self._restart_api,
            "redis_restart": self._restart_redis, "database": self._database,
            "disk_full": self._fill_disk, "slow_clients": self._slow_clients}

    def run(self) -> None:
        began = time.monotonic()
        for fault in self.faults:
            while not self.halt.wait(min(2.0, max(0.0, began + fault.at_s - time.monotonic()))):
                self._supervise()
                if time.monotonic() >= began + fault.at_s:
                    break
            if self.halt.is_set():
                break
            window = self.journal.fault_started(fault.kind, f"(hold {fault.hold_s} s)")
            try:
                window.detail = self.actions[fault.kind](fault)
            except Exception as exc:  # the harness's own failure: reported, never hidden
                self.errors.append(f"{fault.kind} at {fault.at_s} s: {exc!r}")
            finally:
                self._supervise()
                self.journal.fault_ended(window)
        while not self.halt.wait(2.0):
            self._supervise()

    def _supervise(self) -> None:
        """Restart what exited by itself (noted: the summary lists them)."""
        try:
            for what in self.stack.revive():
                self.revived.append(what)
                self.journal.note("supervisor", f"{what} exited by itself; restarted")
        except Exception as exc:
            self.errors.append(f"restarting what exited: {exc!r}")

    def _kill_worker(self, fault: Fault) -> str:
        # The first worker is spared when there are others: it lives the whole run, so its
        # memory and descriptors make one long series that a leak cannot hide in.
        name = self.rng.choice(self.stack.worker_names[1:] or self.stack.worker_names)
        self.stack.kill_worker(name)
        time.sleep(fault.hold_s)
        self.stack.start_worker(name)
        return f"SIGKILLed {name}, restarted"

    def _restart_api(self, fault: Fault) -> str:
        self.stack.restart_api()
        return "API stopped and started again"

    def _restart_redis(self, fault: Fault) -> str:
        port = self.stack.stop_redis()
        time.sleep(fault.hold_s)
        self.stack.start_redis(port)
        return "Redis killed, started empty"

    def _database(self, fault: Fault) -> str:
        if self.stack.pg is not None:
            self.stack.pg.restart()
            return "PostgreSQL restarted (fast shutdown)"
        assert self.stack.sqlite_path is not None
        locker = sqlite3.connect(self.stack.sqlite_path, timeout=30)
        try:
            locker.execute("BEGIN IMMEDIATE")  # the write lock: every writer waits
            time.sleep(fault.hold_s)
        finally:
            locker.rollback()
            locker.close()
        return f"SQLite write-locked for {fault.hold_s} s"

    def _fill_disk(self, fault: Fault) -> str:
        """A ballast file that takes the disk below the API's reserve (FTUNE_MIN_FREE_DISK_MB)."""
        ballast = self.stack.home / "soak-ballast.bin"
        free = shutil.disk_usage(self.stack.home).free
        size = max(1, free - self.stack.min_free_mb * 2**20 + 64 * 2**20)
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            time.sleep(fault.hold_s)
        finally:
            os.close(fd)
            ballast.unlink(missing_ok=True)
        return f"{size // 2**20} MB of ballast held {fault.hold_s} s"

    def _slow_clients(self, fault: Fault) -> str:
        """Connections that send their headers a byte at a time and never finish them."""
        sockets = []
        for _ in range(SLOW_CLIENTS):
            with contextlib.suppress(OSError):
                sock = socket.create_connection(("127.0.0.1", self.stack.api_port), timeout=5)
                sock.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                sockets.append(sock)
        deadline = time.monotonic() + fault.hold_s
        while time.monotonic() < deadline:
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.sendall(b"X")
            time.sleep(0.5)
        for sock in sockets:
            sock.close()
        return f"{len(sockets)} slow connections held {fault.hold_s} s"
