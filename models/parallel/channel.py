"""The line between rank 0 of a data-parallel run and the process that launched it.

Ranks never talk to the service: rank 0 sends what a one-process run would hand its callbacks
(progress, stages, choices, epoch rows, log records) to the launcher, which calls the caller's
callbacks. An epoch's row waits for the launcher's answer, so the checkpoint is stored and the
row recorded before the next epoch starts, as in one process. The socket is an abstract
Unix socket (no file to leave behind) with a random key, so no other process can speak on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

from ftune.models.training.run_setup import Callbacks

# Message kinds, rank 0 to launcher.
BATCH, STAGE, RESOLVED, EPOCH, LOG, DONE = "batch", "stage", "resolved", "epoch", "log", "done"
ACK = "ack"  # launcher to rank 0: the epoch's row is recorded


@dataclass(frozen=True)
class Endpoint:
    address: str
    authkey: bytes

    def to_dict(self) -> dict:
        return {"address": self.address, "authkey": self.authkey.hex()}

    @classmethod
    def from_dict(cls, data: dict) -> Endpoint:
        return cls(data["address"], bytes.fromhex(data["authkey"]))


def listen() -> tuple[Listener, Endpoint]:
    endpoint = Endpoint(f"\0ftune-ranks-{uuid.uuid4().hex}", os.urandom(32))
    return Listener(endpoint.address, family="AF_UNIX", authkey=endpoint.authkey), endpoint


def connect(endpoint: Endpoint) -> Connection:
    return Client(endpoint.address, family="AF_UNIX", authkey=endpoint.authkey)


class RelayedCallbacks:
    """Rank 0's callbacks: each sends its arguments to the launcher."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def send(self, kind: str, payload: Any) -> None:
        self.conn.send((kind, payload))

    def callbacks(self) -> Callbacks:
        return Callbacks(
            on_epoch_end=self._epoch_end,
            on_batch_end=lambda *args: self.send(BATCH, args),
            on_stage=lambda *args: self.send(STAGE, args),
            on_resolved=lambda resolved: self.send(RESOLVED, resolved),
        )

    def _epoch_end(self, row: dict) -> None:
        self.send(EPOCH, row)
        reply = self.conn.recv()
        if reply != ACK:
            raise RuntimeError(f"the launcher answered {reply!r} to an epoch's row")


class RelayedLogs(logging.Handler):
    """Rank 0's log records, sent to the launcher to be logged there (into the job's log)."""

    def __init__(self, relay: RelayedCallbacks) -> None:
        super().__init__(logging.INFO)
        self.relay = relay

    def emit(self, record: logging.LogRecord) -> None:
        # The launcher gone: the run ends at rank 0's next progress message.
        with contextlib.suppress(OSError, EOFError):
            self.relay.send(LOG, (record.levelno, record.name, record.getMessage()))
