"""/metrics for operators: counters and histograms move with real work on the shared stack."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.conftest import wait_for_job

pytestmark = pytest.mark.processes


def scrape(operator_client) -> dict[tuple[str, tuple], float]:
    response = operator_client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_only_operators_may_scrape(client, member_client, api_url):
    import httpx

    assert httpx.get(f"{api_url}/metrics").status_code == 401
    assert client.get("/metrics").status_code == 403  # a tenant's admin
    assert member_client.get("/metrics").status_code == 403


def test_a_job_and_predictions_move_the_counters(client, operator_client, tiny_dataset,
                                                 tiny_folder: Path):
    before = scrape(operator_client)
    job = client.post("/v1/jobs", json={"dataset_id": tiny_dataset["id"], "spec": {
        "preset": "fast", "image_size": 32, "batch_size": 12}}).json()
    done = wait_for_job(client, job["id"], timeout_s=180)
    assert done["status"] == "succeeded", done["error"]
    image = next(tiny_folder.rglob("*.png")).read_bytes()
    for _ in range(2):  # the first loads the model (a miss), the second finds it (a hit)
        response = client.post(f"/v1/models/{done['model_id']}/predict",
                               files=[("files", ("a.png", image)), ("files", ("b.png", image))])
        assert response.status_code == 200, response.text
    after = scrape(operator_client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("ftune_jobs_finished_total", state="succeeded") == 1
    assert moved("ftune_job_duration_seconds_count") == 1
    assert moved("ftune_job_duration_seconds_sum") > 0
    assert moved("ftune_epoch_seconds_count") == len(done["metrics"])
    assert value(after, "ftune_jobs", state="succeeded", tenant="team-a") >= 1
    assert moved("ftune_request_seconds_count", route="predict") == 2
    assert moved("ftune_predict_batch_images_count") == 2
    assert moved("ftune_predict_batch_images_sum") == 4  # two images per request
    assert moved("ftune_model_cache_requests_total", result="miss") == 1
    assert moved("ftune_model_cache_requests_total", result="hit") >= 1
    assert value(after, "ftune_model_cache_bytes") > 0
    assert value(after, "ftune_workers_alive") >= 1
    ages = [v for (name, _), v in after.items() if name == "ftune_worker_heartbeat_age_seconds"]
    assert ages and all(0 <= age < 60 for age in ages)
    assert "ftune_queue_depth" in {name for name, _ in after}


def test_uploads_are_timed(client, operator_client, tiny_folder):
    from ftune.testing.archives import zip_folder

    before = scrape(operator_client)
    response = client.post("/v1/datasets", files={"file": ("t.zip", zip_folder(tiny_folder))})
    assert response.status_code in (200, 201), response.text
    bad = client.post("/v1/datasets", files={"file": ("t.zip", b"not a zip")})
    assert bad.status_code == 422
    after = scrape(operator_client)
    assert value(after, "ftune_request_seconds_count", route="upload") - \
        value(before, "ftune_request_seconds_count", route="upload") == 2


def test_the_grafana_dashboard_and_compose_profile_use_what_we_export(operator_client):
    import json
    import re

    import yaml

    root = Path(__file__).resolve().parents[2]
    # Every family the scrape declares (# TYPE), with the series names it makes.
    text = operator_client.get("/metrics").text
    families = re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)
    exported = {name + suffix for name, _ in families
                for suffix in ("", "_bucket", "_count", "_sum", "_total")}
    dashboard = json.loads((root / "deploy" / "grafana" / "ftune.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"ftune_[a-z_]+", target["expr"])}
    assert queried and queried <= exported, queried - exported
    services = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == [
        "monitoring"]
    scrape_config = yaml.safe_load((root / "deploy" / "prometheus" / "prometheus.yml")
                                   .read_text())["scrape_configs"][0]
    assert scrape_config["metrics_path"] == "/metrics"
    assert scrape_config["authorization"]["credentials_file"]
