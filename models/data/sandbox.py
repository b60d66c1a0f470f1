"""Unpack and check an untrusted archive in a child process with memory, CPU and time limits.

A hostile archive can cost far more than its size before any limit of ``archives`` applies:
the standard library's tar and zip readers parse headers whole, recurse, or (Python 3.11.7,
CVE-2024-6232) take quadratic time holding the GIL. So the service never parses an upload in
its own process: ``unpack_and_inspect`` runs ``python -m ftune.models.data.sandbox``, which
unpacks into ``dest``, runs the dataset check and prints one JSON line (the lint report and
what the service stores). A child that runs out of memory, CPU time or wall-clock time is
killed and the upload refused with an ``ArchiveError`` naming the limit; ``dest`` is removed
on every failure.

The child sets its own limits first thing, before it opens the archive. Setting them in
``preexec_fn`` instead would run Python between fork and exec, which is documented as unsafe
in a process with threads, and the API calls this from a thread pool.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ftune.models.data.archives import ArchiveLimits, Unpacked, unpack
from ftune.models.data.discover import dataset_hash, inspect_dataset
from ftune.models.data.findings import MAX_ITEMS, Finding
from ftune.models.data.layout import Listing, list_dataset
from ftune.models.data.lint import LintReport
from ftune.models.data.trees import remove_tree
from ftune.models.errors import ArchiveError, ArchiveTooLarge, DatasetError
from ftune.models.settings import EngineSettings, configure, load_settings

log = logging.getLogger(__name__)

MODULE = "ftune.models.data.sandbox"
_ALARM_GRACE_S = 5  # the child's own wall-clock backstop, after the parent's timeout
_STDERR_TAIL = 4000  # bytes of a failed child's stderr that are logged
# How a child killed by the kernel for want of memory (or crashing in C for want of it) ends.
_MEMORY_SIGNALS = frozenset({-signal.SIGKILL, -signal.SIGSEGV, -signal.SIGBUS, -signal.SIGABRT})


@dataclass(frozen=True)
class SandboxResult:
    """What the child found: the lint report and what the service stores with a dataset."""

    report: dict  # LintReport.to_dict()
    content_hash: str | None
    classes: list[str]
    num_images: int
    splits: dict[str, int]  # split -> usable images
    class_counts: dict[str, dict[str, int]]  # split -> class -> usable images
    size_bytes: int  # of the unpacked files
    files: int

    @property
    def ok(self) -> bool:
        return bool(self.report.get("ok"))

    @property
    def errors(self) -> list[dict]:
        return list(self.report.get("errors", []))

    @property
    def warnings(self) -> list[dict]:
        return list(self.report.get("warnings", []))


def unpack_and_inspect(archive: Path | None, dest: Path, *, limits: ArchiveLimits,
                       min_per_class: int, max_pixels: int, max_classes: int, memory_mb: int,
                       cpu_s: int, timeout_s: float, kind: str = "labeled") -> SandboxResult:
    """Unpack ``archive`` into the new folder ``dest`` and check the dataset, in a child
    (``archive`` None: check the folder ``dest`` as it is, a dataset version's tree).

    ``ArchiveTooLarge`` when it unpacks past ``limits.max_bytes``, ``ArchiveError`` for any
    other refusal, a damaged archive or a child over a limit; ``dest`` is then gone.
    """
    request = {"archive": None if archive is None else str(archive), "dest": str(dest),
               "limits": asdict(limits),
               "min_per_class": min_per_class, "max_pixels": max_pixels,
               "max_classes": max_classes, "memory_mb": memory_mb, "cpu_s": cpu_s,
               "timeout_s": timeout_s, "kind": kind}
    try:
        done = subprocess.run([sys.executable, "-P", "-m", MODULE], check=False,
                              input=json.dumps(request).encode(), capture_output=True,
                              timeout=timeout_s, env={**os.environ, "MALLOC_ARENA_MAX": "2"})
        return _outcome(done, memory_mb=memory_mb, cpu_s=cpu_s, timeout_s=timeout_s)
    except subprocess.TimeoutExpired:  # run() has killed the child
        remove_tree(dest)
        raise ArchiveError(_timeout_message(timeout_s)) from None
    except BaseException:
        remove_tree(dest)
        raise


def _outcome(done: subprocess.CompletedProcess, *, memory_mb: int, cpu_s: int,
             timeout_s: float) -> SandboxResult:
    """The child's result, or the error it reported, or why it was stopped."""
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        payload = json.loads(lines[-1]) if lines else {}
    except ValueError:
        payload = {}
    if "result" in payload:
        return SandboxResult(**payload["result"])
    if "error" in payload:
        kind, message = payload["error"]["kind"], payload["error"]["message"]
        if kind == "memory":
            raise ArchiveError(_memory_message(memory_mb))
        raise (ArchiveTooLarge if kind == "too_large" else ArchiveError)(message)
    tail = done.stderr[-_STDERR_TAIL:].decode("utf-8", "replace")
    if done.returncode == -signal.SIGALRM:
        raise ArchiveError(_timeout_message(timeout_s))
    if done.returncode == -signal.SIGXCPU:
        raise ArchiveError(f"checking the archive used more than {cpu_s} s of CPU time "
                           "(FTUNE_UNPACK_CPU_S); refused")
    if done.returncode in _MEMORY_SIGNALS or "MemoryError" in tail:
        raise ArchiveError(_memory_message(memory_mb))
    log.error("the archive checker stopped with exit code %s: %s", done.returncode, tail)
    raise ArchiveError(f"the archive could not be checked (the checker stopped with exit code "
                       f"{done.returncode}); refused")


def _timeout_message(timeout_s: float) -> str:
    return (f"checking the archive took longer than {timeout_s:g} s (FTUNE_UNPACK_TIMEOUT_S); "
            "refused")


def _memory_message(memory_mb: int) -> str:
    return (f"checking the archive needed more than {memory_mb} MB of memory "
            "(FTUNE_UNPACK_MEMORY_MB); refused")


# The child.

def main() -> int:
    """Read the request on stdin, limit this process, do the work, print one JSON line."""
    request = json.loads(sys.stdin.buffer.read())
    _limit_resources(request["memory_mb"], request["cpu_s"])
    # Should the parent die, its wall-clock limit dies with it: SIGALRM ends this process.
    signal.alarm(math.ceil(request["timeout_s"]) + _ALARM_GRACE_S)
    try:
        payload: dict = {"result": asdict(_unpack_and_inspect(request))}
    except MemoryError:
        payload = _error("memory", "")
    except RuntimeError as exc:  # no address space left for a thread's stack
        if "can't start new thread" not in str(exc):
            raise
        payload = _error("memory", "")
    except ArchiveTooLarge as exc:
        payload = _error("too_large", str(exc))
    except ArchiveError as exc:
        payload = _error("memory" if isinstance(exc.__cause__, MemoryError) else "archive",
                         str(exc))
    except DatasetError as exc:
        payload = _error("dataset", str(exc))
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()
    return 0


def _error(kind: str, message: str) -> dict:
    return {"error": {"kind": kind, "message": message}}


def _limit_resources(memory_mb: int, cpu_s: int) -> None:
    _set_limit(resource.RLIMIT_CORE, 0, 0)  # a child killed for its limits leaves no core
    _set_limit(resource.RLIMIT_AS, memory_mb << 20, memory_mb << 20)
    # SIGXCPU (which ends the process) at the soft limit; SIGKILL a second later, should
    # anything catch it.
    _set_limit(resource.RLIMIT_CPU, cpu_s, cpu_s + 1)


def _set_limit(which: int, soft: int, hard: int) -> None:
    """Lower a limit; never above the hard limit this process already has."""
    current = resource.getrlimit(which)[1]
    if current != resource.RLIM_INFINITY:
        hard = min(hard, current)
    resource.setrlimit(which, (min(soft, hard), hard))


def _unpack_and_inspect(request: dict) -> SandboxResult:
    dest, limits = Path(request["dest"]), ArchiveLimits(**request["limits"])
    # The engine code below reads some limits from the settings: the parent's, not ours.
    configure(load_settings(EngineSettings, max_archive_files=limits.max_files,
                            max_image_pixels=request["max_pixels"],
                            min_images_per_class=request["min_per_class"]))
    unpacked = (unpack(Path(request["archive"]), dest, limits) if request["archive"]
                else _counted(dest))
    # Counted first: checking a dataset of very many classes costs more than it should.
    kind = request.get("kind", "labeled")
    listing = list_dataset(dest, kind)
    if len(set(listing.declared.get("train", []))) > request["max_classes"]:
        return _too_many_classes(listing, request["max_classes"], unpacked)
    inspection = inspect_dataset(dest, min_per_class=request["min_per_class"],
                                 max_pixels=request["max_pixels"], kind=kind)
    report, index = inspection.report, inspection.index
    splits = {split: report.split_images(split) for split in report.splits}
    if report.unlabeled:
        splits["unlabeled"] = report.unlabeled
    return SandboxResult(
        report=report.to_dict(), content_hash=dataset_hash(index), classes=index.classes,
        num_images=report.num_images + report.unlabeled, splits=splits,
        class_counts=report.splits, size_bytes=unpacked.bytes, files=unpacked.files)


def _counted(folder: Path) -> Unpacked:
    """A folder's files and bytes, as ``unpack`` counts what it wrote."""
    sizes = [(Path(top) / name).stat().st_size
             for top, _, names in os.walk(folder) for name in names]
    return Unpacked("folder", files=len(sizes), members=len(sizes), bytes=sum(sizes))


def _too_many_classes(listing: Listing, max_classes: int, unpacked: Unpacked) -> SandboxResult:
    """A report with this one error; the images are not checked."""
    names = sorted(set(listing.declared.get("train", [])))
    finding = Finding("too_many_classes", "error",
                      f"found {len(names)} classes; at most {max_classes} are allowed",
                      "Merge or remove classes, or split the data into several datasets "
                      "(the limit is FTUNE_MAX_CLASSES).", len(names), names[:MAX_ITEMS])
    report = LintReport(listing.layout, [], {}, None, {}, [finding])
    return SandboxResult(report=report.to_dict(), content_hash=None, classes=[],
                         num_images=0, splits={}, class_counts={},
                         size_bytes=unpacked.bytes, files=unpacked.files)


if __name__ == "__main__":
    sys.exit(main())
