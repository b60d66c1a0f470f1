"""Where each kind of blob lives in the store: the one table of keys.

Every key is built from server-made ids, attempt numbers and format names, never from a
user's file name. Everything of one object sits under one prefix, so deleting the object
deletes the prefix (``prefixes_of``)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from ftune.models.export_formats import EXPORT_FORMATS, export_suffix
from ftune.service.ids import is_id


def _id(object_id: str) -> str:
    if not is_id(object_id):
        raise ValueError(f"not a valid id: {object_id!r}")
    return object_id


def dataset_prefix(dataset_id: str) -> str:
    return f"datasets/{_id(dataset_id)}/"


def dataset_key(dataset_id: str) -> str:
    """The checked, unpacked images as one tar (what workers fetch and cache)."""
    return f"{dataset_prefix(dataset_id)}images.tar"


def model_prefix(model_id: str) -> str:
    return f"models/{_id(model_id)}/"


def model_key(model_id: str) -> str:
    """The bundle ``Predictor.load`` reads, as one tar."""
    return f"{model_prefix(model_id)}bundle.tar"


def export_prefix(model_id: str) -> str:
    return f"exports/{_id(model_id)}/"


def export_key(model_id: str, fmt: str) -> str:
    """The model's download in ``fmt`` (built on first request, then kept)."""
    return f"{export_prefix(model_id)}model{export_suffix(fmt)}"


def serving_key(model_id: str) -> str:
    """What ONNX Runtime serves the model with (models.serving.prepare's folder), as a tar;
    under the exports prefix: it counts as an export and goes with the model."""
    return f"{export_prefix(model_id)}serving.tar"


def job_prefix(job_id: str) -> str:
    return f"jobs/{_id(job_id)}/"


def checkpoints_prefix(job_id: str) -> str:
    return f"{job_prefix(job_id)}checkpoints/"


def checkpoint_key(job_id: str, attempt: int) -> str:
    """The checkpoint folder of one attempt, as a tar. The attempt is in the key so a stale
    attempt (its host cut off, the job taken over) can never overwrite a later one's."""
    return f"{checkpoints_prefix(job_id)}attempt-{attempt:04d}.tar"


def log_key(job_id: str, attempt: int) -> str:
    """The worker's log lines of one attempt (JSON lines)."""
    return f"{job_prefix(job_id)}logs/attempt-{attempt:04d}.jsonl"


def logs_prefix(job_id: str) -> str:
    return f"{job_prefix(job_id)}logs/"


_ATTEMPT = re.compile(r"attempt-(\d{4})\.")


def attempt_of(key: str) -> int | None:
    """The attempt number a checkpoint or log key carries."""
    found = _ATTEMPT.search(key.rsplit("/", 1)[-1])
    return int(found.group(1)) if found else None


def prefixes_of(*, datasets: Iterable[str] = (), models: Iterable[str] = (),
                jobs: Iterable[str] = ()) -> list[str]:
    """Every prefix holding those objects' blobs (what their deletion removes)."""
    return ([dataset_prefix(d) for d in datasets]
            + [p for m in models for p in (model_prefix(m), export_prefix(m))]
            + [job_prefix(j) for j in jobs])


# What the objects under each top-level prefix belong to, and what each object is, for
# messages that name what vanished (``errors.py``).
_OWNERS = {"datasets": "dataset", "models": "model", "exports": "model", "jobs": "job"}
_OBJECTS = {"images.tar": "images", "bundle.tar": "files", "checkpoints": "checkpoint",
            "logs": "log", "serving.tar": "ONNX Runtime files"}


def describe(key: str) -> str:
    """The object a key holds in words: ``models/<id>/bundle.tar`` is "model <id>'s files"."""
    parts = key.split("/")
    owner = _OWNERS.get(parts[0])
    if owner is None or len(parts) < 3:
        return f"the stored object {key}"
    if parts[0] == "exports" and parts[2] != "serving.tar":
        suffix = "." + parts[-1].split(".", 1)[-1]
        what = next((f"{name} download" for name, info in EXPORT_FORMATS.items()
                     if info.suffix == suffix), "download")
    else:
        what = _OBJECTS.get(parts[2], "stored object")
    return f"{owner} {parts[1]}'s {what}"
