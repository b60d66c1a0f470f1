"""Datasets, jobs, models and sweeps as the API returns them, with the calls that act on them.

Each object keeps the API's whole answer in ``raw``; the fields people use most are typed
attributes."""

from __future__ import annotations

import base64
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from ftune.client.archive import FolderZip, ProgressFile
from ftune.client.errors import FtuneError, JobFailed
from ftune.client.events import TERMINAL, Event, follow
from ftune.client.progress import ProgressBar
from ftune.client.transport import Transport

ImageInput = str | os.PathLike | bytes | IO[bytes]


def _pages(transport: Transport, path: str, params: dict) -> Iterator[dict]:
    """Every item of a paginated list, following ``next_cursor``."""
    params = {k: v for k, v in params.items() if v is not None}
    while True:
        page = transport.request("GET", path, params=params).json()
        yield from page["items"]
        if not page.get("next_cursor"):
            return
        params["cursor"] = page["next_cursor"]


@dataclass
class Dataset:
    id: str
    name: str
    classes: list[str]
    num_images: int
    report: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False)
    task: str | None = None  # a labelled dataset's: "single_label" or "multi_label"

    @classmethod
    def of(cls, data: dict) -> Dataset:
        return cls(data["id"], data["name"], data["classes"], data["num_images"],
                   data.get("report"), data, data.get("task"))


class Datasets:
    def __init__(self, transport: Transport, progress: bool) -> None:
        self._t, self._progress = transport, progress

    def upload(self, path: str | os.PathLike, *, name: str | None = None,
               dedupe: bool = True, progress: bool | None = None,
               kind: str = "labeled") -> Dataset:
        """Upload an archive (zip, tar, tar.gz) or a folder, which is zipped as it streams.
        The same content uploaded again returns the existing dataset (unless ``dedupe``
        is false), so a retried upload never makes a duplicate. ``kind="unlabeled"``:
        images without labels, in any folders (for a job's ``unlabeled_dataset``)."""
        path = Path(path)
        if not path.exists():
            raise FtuneError(f"{path}: no such file or folder")
        show = self._progress if progress is None else progress
        bar = ProgressBar(f"uploading {path.name}", None, force=show) if show else None
        opened: list[FolderZip | ProgressFile] = []

        def files() -> dict:  # a fresh stream for each attempt
            on_read = bar.update if bar else None
            body = FolderZip(path, on_read) if path.is_dir() else ProgressFile(path, on_read)
            opened.append(body)
            if bar is not None:
                bar.total = body.size_hint
            part = {"file": (f"{path.name}.zip" if path.is_dir() else path.name, body)}
            return part | ({"name": (None, name)} if name else {}) | {"kind": (None, kind)}

        try:
            response = self._t.request("POST", "/datasets", files=files,
                                       params={"dedupe": str(dedupe).lower()})
        finally:
            for body in opened:
                body.close()
            if bar is not None:
                bar.close()
        return Dataset.of(response.json())

    def get(self, dataset_id: str) -> Dataset:
        return Dataset.of(self._t.request("GET", f"/datasets/{dataset_id}").json())

    def list(self, *, limit: int | None = None) -> Iterator[Dataset]:
        for item in _pages(self._t, "/datasets", {"limit": limit}):
            yield Dataset.of(item)

    def report(self, dataset_id: str) -> dict:
        return self._t.request("GET", f"/datasets/{dataset_id}/report").json()

    def delete(self, dataset_id: str) -> None:
        self._t.request("DELETE", f"/datasets/{dataset_id}")

    def new_version(self, parent: Dataset | str, *, unlabeled: Dataset | str,
                    labels: Mapping[str, str | Sequence[str]],
                    name: str | None = None) -> Dataset:
        """The next version of ``parent``: its images plus images of the dataset of
        unlabelled images ``unlabeled``, labelled (path -> class, or a label list)."""
        body = {"unlabeled_dataset_id": _id(unlabeled),
                "labels": {path: v if isinstance(v, str) else [*v] for path, v in labels.items()},
                **({"name": name} if name else {})}
        return Dataset.of(self._t.request("POST", f"/datasets/{_id(parent)}/versions",
                                          json=body).json())


@dataclass
class Job:
    id: str
    status: str
    dataset_id: str
    model_id: str | None
    error: str | None
    progress: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)
    _transport: Transport = field(repr=False, compare=False)

    @classmethod
    def of(cls, data: dict, transport: Transport) -> Job:
        return cls(data["id"], data["status"], data["dataset_id"], data.get("model_id"),
                   data.get("error"), data.get("progress") or {}, data, transport)

    @property
    def metrics(self) -> list[dict]:
        return self.raw.get("metrics", [])

    @property
    def resolved(self) -> dict:
        return self.raw.get("resolved") or {}

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def refresh(self) -> Job:
        fresh = Job.of(self._transport.request("GET", f"/jobs/{self.id}").json(),
                       self._transport)
        self.__dict__.update(fresh.__dict__)
        return self

    def wait(self, *, timeout: float | None = None, poll_s: float = 1.0,
             check: bool = True) -> Job:
        """Poll until the job ends; raise JobFailed when it did not succeed (``check``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.refresh().done:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} still {self.status} after {timeout} s")
            time.sleep(poll_s)
        if check and self.status != "succeeded":
            raise JobFailed(self.raw)
        return self

    def stream(self, last_event_id: int = 0) -> Iterator[Event]:
        """The job's events as they happen (status, stage, resolved, epoch, progress, note),
        until its final status; a dropped connection resumes with ``Last-Event-ID``."""
        return follow(self._transport, self.id, last_event_id)

    def cancel(self) -> Job:
        data = self._transport.request("POST", f"/jobs/{self.id}/cancel").json()
        self.__dict__.update(Job.of(data, self._transport).__dict__)
        return self

    def model(self) -> Model:
        if not self.model_id:
            raise FtuneError(f"job {self.id} has no model (status {self.status})")
        return Models(self._transport).get(self.model_id)


def _merge(spec: dict, fields: dict) -> dict:
    """``spec`` with keyword fields on top; ``optimizer__lr=0.01`` sets ``optimizer.lr``."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in spec.items()}
    for name, value in fields.items():
        *parents, leaf = name.split("__")
        target = merged
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return merged


class Jobs:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def create(self, dataset: Dataset | str, spec: dict | None = None, *, priority: int = 5,
               unlabeled_dataset: Dataset | str | None = None, model_name: str | None = None,
               max_runtime_s: int | None = None, **fields: Any) -> Job:
        """Submit a fine-tuning job; ``spec`` and keyword ``fields`` (``preset="fast"``,
        ``epochs=3``, ``optimizer__lr=1e-3``) together make the spec, and are sent inside
        it: ``create(ds, preset="fast")`` posts ``{"dataset_id": ..., "spec": {"preset":
        "fast"}}`` (over HTTP, spec fields go inside ``spec``, never beside it). Unset fields
        are auto. ``unlabeled_dataset``: one uploaded with ``kind="unlabeled"``, for the
        spec's ``pretrain`` and ``pseudo_labels``. ``model_name``: the tuned model's name
        (default: the dataset's); ``max_runtime_s``: fail the job if it runs longer."""
        dataset_id = dataset.id if isinstance(dataset, Dataset) else dataset
        body = {"dataset_id": dataset_id, "spec": _merge(spec or {}, fields),
                "priority": priority}
        if unlabeled_dataset is not None:
            body["unlabeled_dataset_id"] = (unlabeled_dataset.id if isinstance(
                unlabeled_dataset, Dataset) else unlabeled_dataset)
        if model_name is not None:
            body["model_name"] = model_name
        if max_runtime_s is not None:
            body["max_runtime_s"] = max_runtime_s
        return Job.of(self._t.request("POST", "/jobs", json=body).json(), self._t)

    def get(self, job_id: str) -> Job:
        return Job.of(self._t.request("GET", f"/jobs/{job_id}").json(), self._t)

    def list(self, *, status: str | None = None, limit: int | None = None) -> Iterator[Job]:
        for item in _pages(self._t, "/jobs", {"status": status, "limit": limit}):
            yield Job.of(item, self._t)


@dataclass
class Model:
    id: str
    name: str
    version: int
    aliases: list[str]
    classes: list[str]
    metrics: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)
    _transport: Transport = field(repr=False, compare=False)
    task: str = "single_label"  # or "multi_label": predict() gives label sets

    @property
    def serving(self) -> dict[str, Any]:
        """Which engine serves it (``engine``, ``why``) and the parity and int8 figures."""
        return self.raw.get("serving") or {}

    @classmethod
    def of(cls, data: dict, transport: Transport) -> Model:
        return cls(data["id"], data["name"], data["version"], data.get("aliases", []),
                   data["classes"], data.get("metrics", {}), data, transport,
                   data.get("task", "single_label"))

    def predict(self, images: ImageInput | list[ImageInput], *,
                top_k: int | None = None) -> list:
        """One entry per image, in order: a single-label model's top-k ``{label, score}``;
        a multi-label model's ``{"labels": [over threshold], "scores": [{label, score}]}``.
        Images are paths, bytes or open binary files."""
        items = images if isinstance(images, list) else [images]

        def files() -> list:
            return [("files", _image_part(item, i)) for i, item in enumerate(items)]

        response = self._transport.request("POST", f"/models/{self.id}/predict", files=files,
                                           params={"top_k": top_k} if top_k else None)
        return response.json()["predictions"]

    def explain(self, images: ImageInput | list[ImageInput]) -> list[dict]:
        """One entry per image, in order: its prediction (as ``predict`` gives it) and why:
        ``label`` (the top class), ``heatmap`` (Grad-CAM evidence for it, rows of values in
        [0, 1]) and ``overlay_png`` (PNG bytes: the heat map over the image). The server
        takes at most a few images per request (FTUNE_MAX_EXPLAIN_IMAGES)."""
        items = images if isinstance(images, list) else [images]

        def files() -> list:
            return [("files", _image_part(item, i)) for i, item in enumerate(items)]

        answer = self._transport.request("POST", f"/models/{self.id}/predict", files=files,
                                         params={"explain": "true"}).json()
        return [{**why, "prediction": prediction,
                 "overlay_png": base64.b64decode(why["overlay_png"])}
                for prediction, why in zip(answer["predictions"], answer["explanations"],
                                           strict=True)]

    def evaluation(self) -> dict:
        return self._transport.request("GET", f"/models/{self.id}/evaluation").json()

    def card(self) -> str:
        return self._transport.request("GET", f"/models/{self.id}/card").text

    def download(self, path: str | os.PathLike, *, format: str = "safetensors") -> Path:
        """Save the model (safetensors zip, onnx, torchscript or a Triton repository zip)
        at ``path``, written whole or not at all."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            response = self._transport.stream("GET", f"/models/{self.id}/download",
                                              params={"format": format})
            try:
                with os.fdopen(fd, "wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
            finally:
                response.close()
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def suggest(self, unlabeled: Dataset | str, *, count: int = 100,
                measure: str = "margin") -> Job:
        """A suggest job: which images of ``unlabeled`` to label next (``wait()`` for it,
        then ``raw["suggestions"]``)."""
        response = self._transport.request(
            "POST", f"/models/{self.id}/suggestions",
            json={"unlabeled_dataset_id": _id(unlabeled), "count": count, "measure": measure})
        return Job.of(response.json(), self._transport)

    def set_alias(self, alias: str) -> Model:
        """Point ``name:alias`` at this model (tenant admins only)."""
        self._transport.request("PUT", f"/models/aliases/{alias}", json={"model": self.id})
        return Models(self._transport).get(self.id)


def _id(item: Dataset | str) -> str:
    return item if isinstance(item, str) else item.id


def _image_part(item: ImageInput, index: int) -> tuple[str, Any]:
    if isinstance(item, bytes):
        return f"image{index}", item
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        return path.name, path.read_bytes()
    return getattr(item, "name", f"image{index}"), item.read()


class Models:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def get(self, ref: str) -> Model:
        """A model by id, name (its latest version), ``name:version`` or ``name:alias``."""
        path = f"/models/{quote(ref, safe=':')}"  # names may hold spaces, '#' or '?'
        return Model.of(self._t.request("GET", path).json(), self._t)

    def list(self, *, limit: int | None = None) -> Iterator[Model]:
        for item in _pages(self._t, "/models", {"limit": limit}):
            yield Model.of(item, self._t)


@dataclass
class Sweep:
    id: str
    status: str
    dataset_id: str
    raw: dict[str, Any] = field(repr=False)
    _transport: Transport = field(repr=False, compare=False)

    @classmethod
    def of(cls, data: dict, transport: Transport) -> Sweep:
        return cls(data["id"], data["status"], data["dataset_id"], data, transport)

    @property
    def trials(self) -> list[dict]:
        return self.raw.get("trials", [])

    @property
    def best_trial(self) -> dict | None:
        return self.raw.get("best_trial")

    @property
    def done(self) -> bool:
        return self.status != "running"

    def refresh(self) -> Sweep:
        fresh = Sweep.of(self._transport.request("GET", f"/sweeps/{self.id}").json(),
                         self._transport)
        self.__dict__.update(fresh.__dict__)
        return self

    def wait(self, *, timeout: float | None = None, poll_s: float = 2.0) -> Sweep:
        """Poll until the sweep ends (succeeded, failed or cancelled)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.refresh().done:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"sweep {self.id} still running after {timeout} s")
            time.sleep(poll_s)
        return self

    def stream(self, last_event_id: int = 0) -> Iterator[Event]:
        """The sweep's events (status, trial, note) until it ends."""
        return follow(self._transport, self.id, last_event_id, collection="sweeps")

    def cancel(self) -> Sweep:
        data = self._transport.request("POST", f"/sweeps/{self.id}/cancel").json()
        self.__dict__.update(Sweep.of(data, self._transport).__dict__)
        return self

    def promote(self, alias: str = "best") -> dict:
        """Point ``alias`` at the best trial's model; returns {"alias", "model_id", "trial"}."""
        return self._transport.request("POST", f"/sweeps/{self.id}/promote",
                                       json={"alias": alias}).json()

    def plot(self, path: str | os.PathLike) -> Path:
        target = Path(path)
        target.write_bytes(self._transport.request("GET", f"/sweeps/{self.id}/plot.png")
                           .content)
        return target


class Sweeps:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def create(self, dataset: Dataset | str, space: dict, base: dict | None = None,
               **options: Any) -> Sweep:
        """Start a sweep over ``space`` (spec path -> distribution) from ``base``; options:
        objective, n_trials, parallelism, pruner, sampler, max_total_s, seed, model_name."""
        dataset_id = dataset.id if isinstance(dataset, Dataset) else dataset
        body = {"dataset_id": dataset_id, "space": space, "base": base or {}, **options}
        return Sweep.of(self._t.request("POST", "/sweeps", json=body).json(), self._t)

    def get(self, sweep_id: str) -> Sweep:
        return Sweep.of(self._t.request("GET", f"/sweeps/{sweep_id}").json(), self._t)

    def list(self, *, limit: int | None = None) -> Iterator[Sweep]:
        for item in _pages(self._t, "/sweeps", {"limit": limit}):
            yield Sweep.of(item, self._t)
