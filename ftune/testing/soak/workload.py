"""What each tenant does: a thread per tenant drawing operations from its own generator
(seeded from the soak's seed and its name, so a seed reproduces each tenant's schedule):
uploads (good, duplicate, hostile), jobs (tiny; some cancelled), sweeps, predictions,
downloads in every format, deletes, listings, and probes of other tenants' ids."""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from ftune.testing.soak.api import RecordingClient
from ftune.testing.soak.data import SoakData
from ftune.testing.soak.journal import Journal
from ftune.testing.soak.tenants import KINDS, Tenants, TenantState

TERMINAL = {"succeeded", "failed", "cancelled", "pruned"}
# Tiny jobs (seconds on a CPU) and a slow one to cancel mid-run.
QUICK = {"image_size": 32, "batch_size": 12, "preset": "fast"}
SLOW = {"image_size": 32, "epochs": 8, "batch_size": 6, "freeze": {"strategy": "none"},
        "early_stopping": {"patience": 100}}
MAX_ACTIVE_JOBS = 2  # per tenant: two workers on a shared CPU
MAX_DATASETS = 4
FORMATS = ("safetensors", "onnx", "torchscript")
FORMAT_WEIGHTS = (8, 1, 1)  # the traced ones run an export child process: seconds of CPU


class TenantActor(threading.Thread):
    def __init__(self, state: TenantState, tenants: Tenants, api_url: str, data: SoakData,
                 journal: Journal, seed: int, halt: threading.Event) -> None:
        super().__init__(name=f"soak-{state.name}", daemon=True)
        self.state, self.tenants, self.data, self.journal = state, tenants, data, journal
        self.rng = random.Random(f"{seed}-{state.name}")
        self.halt = halt
        self.api = RecordingClient(api_url, state.key, state.name, journal)
        self.errors: list[str] = []
        self.operations: list[tuple[Callable[[], None], int]] = [
            (self.upload_good, 5), (self.upload_duplicate, 3), (self.upload_hostile, 4),
            (self.submit_job, 10), (self.submit_to_cancel, 2), (self.cancel_one, 3),
            (self.start_sweep, 1), (self.get_job, 14), (self.list_own, 8), (self.predict, 6),
            (self.download, 4), (self.probe_other, 4), (self.delete_dataset, 2),
            (self.delete_model, 2), (self.delete_job, 3), (self.usage, 2)]

    def run(self) -> None:
        calls, weights = zip(*self.operations, strict=True)
        while not self.halt.is_set():
            operation = self.rng.choices(calls, weights)[0]
            try:
                operation()
            except Exception as exc:  # the harness's own mistake: reported, never hidden
                self.errors.append(f"{operation.__name__}: {exc!r}")
                self.journal.note(self.state.name, f"harness error in {operation.__name__}: "
                                  f"{exc!r}")
            self.halt.wait(self.rng.uniform(0.1, 0.6))
        self.api.close()

    # -- checks every answer gets -----------------------------------------------------------
    def _owned(self, kind: str, item: dict[str, Any], where: str) -> None:
        """An object in an answer to this tenant must be this tenant's."""
        owner = self.tenants.owner_of(item.get("id", ""))
        if item.get("tenant_id") != self.state.tenant_id or (
                owner is not None and owner is not self.state):
            self.journal.violate(
                "no tenant sees another's object",
                f"{self.state.name} got {kind} {item.get('id')} of tenant "
                f"{item.get('tenant_id')} ({owner.name if owner else 'unknown'}) from {where}",
                key=f"{self.state.name}:{item.get('id')}")

    def _vanished(self, kind: str, object_id: str, response: httpx.Response) -> None:
        if response.status_code != 404:
            return
        if self.state.may_be_gone(kind, object_id):
            self.state.remove(kind, object_id)  # an unanswered delete had gone through
        else:
            self.journal.violate("nothing vanishes that was not deleted",
                                 f"{self.state.name}'s {kind[:-1]} {object_id}: 404 "
                                 f"({response.text[:200]})", key=object_id)

    def _pick(self, kind: str) -> str | None:
        live = self.state.live(kind)
        return self.rng.choice(live) if live else None

    # -- uploads ----------------------------------------------------------------------------
    def _upload(self, payload: bytes, what: str, dedupe: bool) -> httpx.Response | None:
        response = self.api.request("POST", "/v1/datasets", "/v1/datasets",
                                    files={"file": ("data.zip", payload)},
                                    data={"name": what}, params={"dedupe": str(dedupe).lower()})
        if response is not None and response.status_code in (200, 201):
            self._owned("datasets", response.json(), "an upload")
            self.state.add("datasets", response.json()["id"])
        return response

    def upload_good(self) -> None:
        if len(self.state.live("datasets")) >= MAX_DATASETS:
            return self.delete_dataset()
        payload = self.rng.choice([self.data.good, *self.data.variants])
        self._upload(payload, "good", dedupe=False)
        return None

    def upload_duplicate(self) -> None:
        """The same content again: 200 with this tenant's own earlier dataset (or a new one
        when that was deleted), never another tenant's."""
        self._upload(self.data.good, "duplicate", dedupe=True)

    def upload_hostile(self) -> None:
        name = self.rng.choice(sorted(self.data.hostile))
        response = self._upload(self.data.hostile[name], f"hostile-{name}", dedupe=False)
        if response is not None and response.status_code < 400:
            self.journal.violate("a hostile archive is refused with a 4xx",
                                 f"{name} was accepted: {response.status_code}", key=name)

    # -- jobs and sweeps ----------------------------------------------------------------------
    def _submit(self, spec: dict[str, Any]) -> str | None:
        dataset = self._pick("datasets")
        if dataset is None or len(self.state.active_jobs()) >= MAX_ACTIVE_JOBS:
            return None
        headers = {}
        if self.rng.random() < 0.3:
            headers["Idempotency-Key"] = uuid.UUID(int=self.rng.getrandbits(128)).hex
        body = {"dataset_id": dataset, "spec": spec}
        response = self.api.request("POST", "/v1/jobs", "/v1/jobs", json=body, headers=headers)
        if response is None or response.status_code != 202:
            return None
        job = response.json()
        self._owned("jobs", job, "a submit")
        self.state.add("jobs", job["id"])
        if headers:  # the same key and body again: the same job
            again = self.api.request("POST", "/v1/jobs", "/v1/jobs", json=body, headers=headers)
            if again is not None and again.status_code == 202 and again.json()["id"] != job["id"]:
                self.journal.violate("an Idempotency-Key gives one job",
                                     f"{job['id']} then {again.json()['id']}", key=job["id"])
        return job["id"]

    def submit_job(self) -> None:
        self._submit({**QUICK, "epochs": self.rng.choice([1, 2]),
                      "seed": self.rng.randrange(1000)})

    def submit_to_cancel(self) -> None:
        job_id = self._submit(SLOW)
        if job_id is not None:
            self.state.to_cancel.append(job_id)

    def cancel_one(self) -> None:
        if not self.state.to_cancel:
            return
        job_id = self.state.to_cancel.pop(0)
        response = self.api.request("POST", f"/v1/jobs/{job_id}/cancel", "/v1/jobs/{id}/cancel")
        if response is not None:
            self._vanished("jobs", job_id, response)

    def start_sweep(self) -> None:
        dataset = self._pick("datasets")
        if dataset is None or len(self.state.active_jobs()) >= MAX_ACTIVE_JOBS:
            return
        body = {"dataset_id": dataset, "base": {**QUICK, "epochs": 1}, "n_trials": 2,
                "parallelism": 1, "pruner": "none", "sampler": "random",
                "space": {"optimizer.lr": {"log_uniform": [1e-3, 1e-1]}},
                "seed": self.rng.randrange(1000)}
        response = self.api.request("POST", "/v1/sweeps", "/v1/sweeps", json=body)
        if response is not None and response.status_code == 202:
            self._owned("sweeps", response.json(), "a sweep submit")
            self.state.add("sweeps", response.json()["id"])

    def get_job(self) -> None:
        if self.rng.random() < 0.3 and (sweep := self._pick("sweeps")) is not None:
            return self._get_sweep(sweep)
        active = self.state.active_jobs()
        job_id = self.rng.choice(active) if active else self._pick("jobs")
        if job_id is None:
            return None
        response = self.api.request("GET", f"/v1/jobs/{job_id}", "/v1/jobs/{id}")
        if response is None:
            return None
        self._vanished("jobs", job_id, response)
        if response.status_code == 200:
            job = response.json()
            self._owned("jobs", job, f"GET /v1/jobs/{job_id}")
            if job["status"] in TERMINAL:
                with self.state.lock:
                    self.state.finished_jobs.add(job_id)
            if job.get("model_id"):
                self.state.add("models", job["model_id"])
        return None

    def _get_sweep(self, sweep_id: str) -> None:
        response = self.api.request("GET", f"/v1/sweeps/{sweep_id}", "/v1/sweeps/{id}")
        if response is None or response.status_code != 200:
            return
        sweep = response.json()
        self._owned("sweeps", sweep, f"GET /v1/sweeps/{sweep_id}")
        for trial in sweep.get("trials", []):
            if trial.get("job_id"):
                self.state.add("jobs", trial["job_id"])

    def list_own(self) -> None:
        kind = self.rng.choice(KINDS)
        response = self.api.request("GET", f"/v1/{kind}", f"/v1/{kind}", params={"limit": 100})
        if response is not None and response.status_code == 200:
            for item in response.json()["items"]:
                self._owned(kind, item, f"GET /v1/{kind}")

    # -- models -------------------------------------------------------------------------------
    def predict(self) -> None:
        model = self._pick("models")
        if model is None:
            return
        response = self.api.request("POST", f"/v1/models/{model}/predict",
                                    "/v1/models/{id}/predict",
                                    files={"files": ("a.png", self.data.image)})
        if response is not None:
            self._vanished("models", model, response)

    def download(self) -> None:
        model = self._pick("models")
        if model is None:
            return
        fmt = self.rng.choices(FORMATS, FORMAT_WEIGHTS)[0]
        response = self.api.request("GET", f"/v1/models/{model}/download",
                                    f"/v1/models/{{id}}/download?format={fmt}",
                                    params={"format": fmt})
        if response is not None:
            self._vanished("models", model, response)

    # -- other tenants ------------------------------------------------------------------------
    def probe_other(self) -> None:
        """Another tenant's object by its id: 404, as if it did not exist."""
        other = self.rng.choice(self.tenants.others(self.state))
        kind = self.rng.choice(KINDS)
        with other.lock:
            ids = sorted(other.owned[kind])
        if not ids:
            return
        object_id = self.rng.choice(ids)
        response = self.api.request("GET", f"/v1/{kind}/{object_id}",
                                    f"/v1/{kind}/{{another tenant's id}}")
        if response is not None and response.status_code != 404 and response.status_code < 500:
            self.journal.violate("no tenant sees another's object",
                                 f"{self.state.name} asked for {other.name}'s {kind[:-1]} "
                                 f"{object_id}: {response.status_code}", key=object_id)

    # -- deletes and usage ----------------------------------------------------------------------
    def _remove_object(self, kind: str, object_id: str, query: str = "") -> bool:
        response = self.api.request("DELETE", f"/v1/{kind}/{object_id}{query}",
                                    f"/v1/{kind}/{{id}}")
        if response is None or response.status_code >= 500:  # done or not: nobody can say
            self.state.perhaps_removed(kind, object_id)
        if response is None:
            return False
        self._vanished(kind, object_id, response)
        if response.status_code == 204:
            self.state.remove(kind, object_id)
        return response.status_code == 204

    def delete_dataset(self) -> None:
        if (dataset := self._pick("datasets")) is not None:
            self._remove_object("datasets", dataset)

    def delete_model(self) -> None:
        if (model := self._pick("models")) is not None:
            self._remove_object("models", model, "?force=true")

    def delete_job(self) -> None:
        with self.state.lock:
            finished = sorted(self.state.finished_jobs - self.state.deleted["jobs"])
        if finished:
            self._remove_object("jobs", self.rng.choice(finished))

    def usage(self) -> None:
        self.api.request("GET", "/v1/usage", "/v1/usage")
