"""Fuzzing the live API from its own OpenAPI document: every operation, with valid and
invalid requests, must never answer 5xx, and the API must be healthy afterwards.

The stack is the fuzzer's own (it deletes and revokes what it finds), seeded with a dataset,
a trained model with an alias, a finished job, a spare key and a spare tenant, so that
generated requests reach real objects and not only 404s. `make test` runs a bounded pass
with a fixed seed; `make fuzz` runs a long one (FTUNE_FUZZ_EXAMPLES, FTUNE_FUZZ_PHASES).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ftune.processes import Stack
from ftune.service.auth.principal import Role
from ftune.testing.access import make_key
from ftune.testing.archives import zip_folder
from tests.service.conftest import wait_for_job

EXAMPLES = os.environ.get("FTUNE_FUZZ_EXAMPLES", "12")
PHASES = os.environ.get("FTUNE_FUZZ_PHASES", "examples,coverage,fuzzing")
# A fixed seed in make test; `random` (make fuzz) picks one, printed in the output to rerun.
SEED = os.environ.get("FTUNE_FUZZ_SEED") or "20261129"
if SEED == "random":
    SEED = str(random.randrange(2**31))
# Generous limits: the fuzzer sends far more requests than any client; the limits have tests.
ENV = {"FTUNE_RATE_UPLOADS": "1000000/minute", "FTUNE_RATE_JOBS": "1000000/minute",
       "FTUNE_RATE_PREDICTIONS": "1000000/minute", "FTUNE_MAX_UPLOAD_MB": "4",
       "FTUNE_CANCEL_POLL_S": "0.2",
       # Generated specs are valid now: keep the jobs they start few and short (429 beyond).
       "FTUNE_QUOTA_ACTIVE_JOBS": "3", "FTUNE_QUOTA_EPOCH_IMAGES": "400"}


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory, tiny_folder) -> Iterator[tuple[str, str, dict[str, str]]]:
    """The API's URL, an operator key and real ids for every path parameter."""
    home = tmp_path_factory.mktemp("fuzz-home")
    with Stack(home, env=ENV, log_dir=home) as stack:
        stack.start_redis(password="fuzz")
        url = stack.start_api()
        stack.start_worker("fuzz-worker@localhost")
        key = make_key(f"sqlite:///{home / 'ftune.db'}", role=Role.OPERATOR)
        with key.client(url, timeout=120) as http:
            ids = _seed(http, tiny_folder)
        yield url, key.key, ids


def _seed(http: httpx.Client, tiny_folder: Path) -> dict[str, str]:
    dataset = http.post("/v1/datasets", files={"file": ("t.zip", zip_folder(tiny_folder))},
                        data={"name": "fuzzed"}).json()
    job = http.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": {
        "image_size": 32, "epochs": 1, "batch_size": 12, "preset": "fast"}}).json()
    done = wait_for_job(http, job["id"], timeout_s=240)
    assert done["status"] == "succeeded", done["error"]
    assert http.put("/v1/models/aliases/prod", json={"model": done["model_id"]}).is_success
    spare_key = http.post("/v1/keys", json={"name": "spare", "tenant": "default"}).json()
    http.post("/v1/tenants", json={"name": "spare-tenant"})
    sweep = http.post("/v1/sweeps", json={"dataset_id": dataset["id"], "n_trials": 1, "base": {
        "image_size": 32, "epochs": 1, "batch_size": 12, "preset": "fast"},
        "space": {"head.dropout": {"uniform": [0, 0.5]}}}).json()
    return {"dataset_id": dataset["id"], "job_id": job["id"], "model_ref": done["model_id"],
            "alias": "prod", "key_id": spare_key["id"], "tenant_ref": "spare-tenant",
            "sweep_id": sweep["id"]}


def test_no_request_gets_a_server_error(fuzz_target, tmp_path):
    url, key, ids = fuzz_target
    config = tmp_path / "schemathesis.toml"
    config.write_text("[parameters]\n" + "".join(f'"path.{name}" = "{value}"\n'
                                                  for name, value in ids.items()))
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
         f"{url}/openapi.json", "--checks", "not_a_server_error", "--mode", "all",
         "--phases", PHASES, "--max-examples", EXAMPLES, "--seed", SEED, "--workers", "1",
         "--suppress-health-check", "all", "--request-timeout", "60",
         "--header", f"Authorization: Bearer {key}", "--report", "json",
         "--report-dir", str(tmp_path / "report")],
        capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    output = run.stdout + run.stderr
    print(output[-4000:])  # shown with -s, and with the failure
    assert run.returncode == 0, output[-8000:]
    operations = sum(len(methods) for methods in
                     httpx.get(f"{url}/openapi.json").json()["paths"].values())
    tested = re.search(r"Tested:\s+(\d+)", output)
    assert tested and int(tested.group(1)) == operations, output[-3000:]
    health = httpx.get(f"{url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    report = next((tmp_path / "report").glob("*.json"))
    assert json.loads(report.read_text())  # the run's record, kept with the test's files
