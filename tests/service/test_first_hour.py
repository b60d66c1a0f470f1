"""The mistakes of a first hour with the API get answers that say what to do: a spec field
beside the spec, a key without its scheme, a folder sent as a file, a model named without a
version; and what it hands out reads right: downloads with one file mode, a card whose
Reproduce spec holds the values used."""

from __future__ import annotations

import io
import json
import stat
import uuid
import zipfile

import httpx
import pytest

from tests.service.conftest import wait_for_job


def test_a_spec_field_beside_the_spec_says_it_goes_inside(client, tiny_dataset):
    response = client.post("/v1/jobs", json={"dataset_id": tiny_dataset["id"],
                                             "preset": "fast", "epochs": 1})
    assert response.status_code == 422, response.text
    body = response.json()
    assert {tuple(e["loc"]) for e in body["errors"]} == {("preset",), ("epochs",)}
    assert 'preset: a spec field, which goes inside `spec`: {"spec": {"preset": ...}}' \
        in body["detail"]
    assert "Extra inputs" not in body["detail"]


def test_a_sweep_s_spec_field_goes_inside_base_and_other_extras_stay_plain(client,
                                                                           tiny_dataset):
    sweep = client.post("/v1/sweeps", json={"dataset_id": tiny_dataset["id"], "space": {},
                                            "preset": "fast"})
    assert sweep.status_code == 422
    assert '{"base": {"preset": ...}}' in sweep.json()["detail"]
    unknown = client.post("/v1/jobs", json={"dataset_id": tiny_dataset["id"], "colour": 1})
    assert unknown.status_code == 422
    assert unknown.json()["detail"] == "colour: Extra inputs are not permitted"


@pytest.mark.parametrize(("headers", "needle"), [
    ({"Authorization": "ftk_" + "x" * 43}, "the Authorization header has no scheme"),
    ({"Authorization": "Token ftk_" + "x" * 43}, "the Authorization header's scheme is 'Token'"),
    ({"Authorization": "Bearer"}, "no key after Bearer"),
    ({"X-API-Key": "ftk_" + "x" * 43}, "API keys are not read from X-API-Key"),
    ({}, "missing API key"),
])
def test_a_key_sent_the_wrong_way_is_told_the_header_to_use(api_url, headers, needle):
    response = httpx.get(f"{api_url}/v1/datasets", headers=headers, timeout=30)
    assert response.status_code == 401
    detail = response.json()["detail"]
    assert needle in detail and "`Authorization: Bearer ftk_…`" in detail, detail
    assert "x" * 10 not in detail  # the key is never echoed


def test_an_empty_upload_explains_how_to_send_a_folder(client):
    # What `curl -F file=@folder` sends: a part with no bytes.
    response = client.post("/v1/datasets", files={"file": ("folder", b"")})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "the uploaded file is empty" in detail
    assert "zip -r ../data.zip ." in detail and "ftune remote datasets upload" in detail


def _train(client, dataset: dict, name: str) -> dict:
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "model_name": name,
                                        "spec": {"image_size": 32, "epochs": 1,
                                                 "batch_size": 12, "preset": "fast"}})
    assert job.status_code == 202, job.text
    done = wait_for_job(client, job.json()["id"], timeout_s=180)
    assert done["status"] == "succeeded", done["error"]
    return client.get(f"/v1/models/{done['model_id']}").json()


def test_a_bare_name_is_its_latest_version_within_the_tenant(client, client_b, tiny_dataset):
    name = f"latest {uuid.uuid4().hex[:8]}"  # a space: the client quotes it in the path
    first, second = _train(client, tiny_dataset, name), _train(client, tiny_dataset, name)
    assert (first["version"], second["version"]) == (1, 2)
    by_name = client.get(f"/v1/models/{name}")
    assert by_name.status_code == 200 and by_name.json()["id"] == second["id"]
    assert client.get(f"/v1/models/{first['id']}").json()["version"] == 1  # ids still win
    assert client.get(f"/v1/models/{name}:1").json()["id"] == first["id"]
    assert client_b.get(f"/v1/models/{name}").status_code == 404  # the other tenant's
    # A delete names its version: a bare name would delete whichever is latest.
    refused = client.delete(f"/v1/models/{name}")
    assert refused.status_code == 422 and f"{name}:VERSION" in refused.json()["detail"]
    assert client.get(f"/v1/models/{name}").json()["id"] == second["id"]
    unknown = client.get("/v1/models/no-such-model")
    assert unknown.status_code == 404
    assert "a name (its latest version), name:version or name:alias" in \
        unknown.json()["detail"]


def test_the_python_client_finds_a_model_by_its_bare_name(api_url, access, client,
                                                          tiny_model):
    from ftune.client import Client

    with Client(api_url, access["a-admin"].key) as python:
        latest = max((m for m in python.models.list() if m.name == tiny_model["name"]),
                     key=lambda m: m.version)
        assert python.models.get(tiny_model["name"]).id == latest.id


def test_every_file_in_a_model_download_is_0644(client, tiny_model):
    response = client.get(f"/v1/models/{tiny_model['id']}/download")
    assert response.status_code == 200
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        modes = {info.filename: info.external_attr >> 16 for info in archive.infolist()}
        assert archive.testzip() is None
    assert {"model.safetensors", "config.json"} <= set(modes), modes
    assert all(stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o644 for mode in modes.values()), \
        {name: oct(mode) for name, mode in modes.items()}


def test_a_real_card_reproduces_with_values_not_auto(client, tiny_model):
    card = client.get(f"/v1/models/{tiny_model['id']}/card?format=json").json()
    # Preset fast trains the head alone: its learning rate is measured, then pinned here.
    assert isinstance(card["resolved_spec"]["optimizer"]["lr"], float)
    assert card["resolved"]["optimizer.lr"]["value"] == card["resolved_spec"]["optimizer"]["lr"]
    markdown = client.get(f"/v1/models/{tiny_model['id']}/card").text
    block = markdown.split("## Reproduce")[1].split("```json\n")[1].split("\n```")[0]
    assert json.loads(block) == card["resolved_spec"]
    assert "= `None`" not in markdown and "= None" not in markdown


def test_the_download_zip_evens_out_the_bundle_s_modes(tmp_path):
    from ftune.models.bundle import BUNDLE_FILES
    from ftune.service.tuned_models import _build_zip

    for mode, name in zip((0o600, 0o644, 0o640), BUNDLE_FILES, strict=True):
        (tmp_path / name).write_bytes(b"x" * 100)
        (tmp_path / name).chmod(mode)
    target = tmp_path / "model.zip"
    _build_zip(tmp_path, target)
    with zipfile.ZipFile(target) as archive:
        assert sorted(archive.namelist()) == sorted(BUNDLE_FILES)
        assert {info.external_attr >> 16 for info in archive.infolist()} == {0o100644}
        assert archive.read(BUNDLE_FILES[0]) == b"x" * 100
