"""Process logs as JSON lines (``FTUNE_LOG_FORMAT=json``), every line of a job tagged with its
``job_id`` and ``tenant``, and each job's own lines kept for ``GET /v1/jobs/{id}/logs``.

The job's context lives in context variables set by the worker around the job, so any logger
in the thread that trains it (the engine's included) is tagged without knowing about jobs.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import re
from collections import deque
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path

from ftune.service.blobs.base import BlobStore
from ftune.service.blobs.keys import logs_prefix

JOB_ID: ContextVar[str | None] = ContextVar("ftune_job_id", default=None)
TENANT: ContextVar[str | None] = ContextVar("ftune_tenant", default=None)
MAX_JOB_LOG_BYTES = 5 * 2**20  # a job's kept lines stop here (a note says so)
MAX_TAIL = 10_000


class JobContextFilter(logging.Filter):
    """Puts the running job's id and tenant on every record (None outside a job)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job_id"):
            record.job_id = JOB_ID.get()
        if not hasattr(record, "tenant"):
            record.tenant = TENANT.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
                 "level": record.levelname, "logger": record.name,
                 "message": record.getMessage(), "process": record.process,
                 "job_id": getattr(record, "job_id", None),
                 "tenant": getattr(record, "tenant", None)}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def use_log_format(log_format: str, logger: logging.Logger | None = None) -> None:
    """Tag records with the job's context on every handler of ``logger`` (the root by
    default), and write them as JSON lines when ``log_format`` is json."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, JobContextFilter) for f in handler.filters):
            handler.addFilter(JobContextFilter())
        if log_format == "json":
            handler.setFormatter(JsonFormatter())


class _JobFileHandler(logging.Handler):
    """One job's lines, as JSON, into its log file; stops at MAX_JOB_LOG_BYTES."""

    def __init__(self, path: Path, job_id: str) -> None:
        super().__init__(logging.INFO)
        self.path, self.job_id = path, job_id
        self.written = path.stat().st_size if path.exists() else 0
        self.addFilter(JobContextFilter())
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "job_id", None) != self.job_id or self.written > MAX_JOB_LOG_BYTES:
            return
        line = self.format(record) + "\n"
        if self.written + len(line) > MAX_JOB_LOG_BYTES:
            line = json.dumps({"ts": datetime.now(UTC).isoformat(), "level": "WARNING",
                               "logger": __name__, "job_id": self.job_id,
                               "message": "log limit reached: later lines are not kept"}) + "\n"
        with self.path.open("a", encoding="utf-8") as out:
            out.write(line)
        self.written += len(line)


@contextlib.contextmanager
def job_logging(path: Path, job_id: str, tenant: str | None) -> Iterator[None]:
    """Within: records of this thread carry the job's id and tenant, and are appended to
    ``path`` (every attempt of the job adds to the same file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _JobFileHandler(path, job_id)
    root = logging.getLogger()
    root.addHandler(handler)
    tokens = JOB_ID.set(job_id), TENANT.set(tenant)
    try:
        yield
    finally:
        JOB_ID.reset(tokens[0])
        TENANT.reset(tokens[1])
        root.removeHandler(handler)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/>])/(?:[\w.@+-]+/)+([\w.@+-]*)")


def redact(text: str, home: Path) -> str:
    """No server path leaves: the data directory becomes ``<data>``, any other absolute path
    its last part under ``<path>``."""
    for root in {str(home), str(home.resolve())}:
        text = text.replace(root, "<data>")
    return _ABSOLUTE_PATH.sub(lambda m: f"<path>/{m.group(1)}", text)


def stored_log_lines(store: BlobStore, job_id: str) -> Iterator[str]:
    """The job's log lines as its workers shipped them to the store, attempt after
    attempt (each attempt's worker ships its own object; see ``blobs.keys.log_key``). An
    object deleted with its job after the listing raises BlobMissing (a 404 naming it)."""
    for key in sorted(store.keys(logs_prefix(job_id))):
        decoder, pending = codecs.getincrementaldecoder("utf-8")("replace"), ""
        for chunk in store.read_chunks(key):
            pending += decoder.decode(chunk)
            *complete, pending = pending.split("\n")
            yield from (f"{line}\n" for line in complete)
        if pending := pending + decoder.decode(b"", final=True):
            yield pending


def read_job_log(source: Iterable[str], home: Path, tail: int) -> list[dict]:
    """The last ``tail`` of the job's log lines, redacted; a line that is not JSON is kept as
    text."""
    lines: deque[str] = deque(source, maxlen=max(1, min(tail, MAX_TAIL)))
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            entry = {"message": line.rstrip("\n")}
        if not isinstance(entry, dict):
            entry = {"message": str(entry)}
        for key in ("message", "exception", "logger"):
            if isinstance(entry.get(key), str):
                entry[key] = redact(entry[key], home)
        entry.pop("process", None)
        entries.append(entry)
    return entries
