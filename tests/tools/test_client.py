"""The Python client against a real ``ftune up``: upload a folder (zipped as it streams), submit,
follow the events, wait, predict, download, alias; errors carry the API's words."""

from __future__ import annotations

import zipfile

import httpx
import pytest

from ftune import Client
from ftune.client import ApiError, JobFailed
from ftune.models.bundle import WEIGHTS_FILE

pytestmark = pytest.mark.processes

FAST = {"preset": "fast", "image_size": 32, "batch_size": 12}


@pytest.fixture(scope="module")
def client(up) -> Client:
    with Client(up.url, up.admin_key) as client:
        yield client


@pytest.fixture(scope="module")
def dataset(client, tiny_folder):
    return client.datasets.upload(tiny_folder, name="tiny")


def test_a_folder_uploads_zipped_on_the_fly_and_again_gives_the_same_dataset(
        client, dataset, tiny_folder):
    assert dataset.num_images == 36 and dataset.classes == sorted(dataset.classes)
    assert dataset.report and dataset.report["ok"]
    again = client.datasets.upload(tiny_folder, name="tiny")  # a retried upload, say
    assert again.id == dataset.id and again.raw["deduplicated"] is True
    assert dataset.id in {d.id for d in client.datasets.list()}
    assert client.datasets.report(dataset.id)["num_images"] == 36


def test_a_job_streams_its_events_then_its_model_predicts_downloads_and_takes_an_alias(
        client, dataset, tiny_folder, tmp_path, up):
    job = client.jobs.create(dataset, FAST, epochs=2, optimizer__name="adam")
    assert job.raw["spec"]["optimizer"]["name"] == "adam" and job.raw["spec"]["epochs"] == 2
    events = list(job.stream())
    kinds = [e.kind for e in events]
    assert {"status", "stage", "epoch"} <= set(kinds)
    assert events[-1].kind == "status" and events[-1].data["status"] == "succeeded"
    assert [e.id for e in events] == sorted(e.id for e in events)
    # Resuming the stream after an event gives exactly the events after it.
    later = list(job.stream(last_event_id=events[2].id))
    assert [e.id for e in later] == [e.id for e in events[3:]]
    job.wait(timeout=60)
    assert job.status == "succeeded" and len(job.metrics) == 2 and job.resolved

    model = job.model()
    image = next(tiny_folder.rglob("*.png"))
    top = model.predict([image, image.read_bytes()], top_k=2)
    assert len(top) == 2 and len(top[0]) == 2
    assert [p["label"] for p in top[0]] == [p["label"] for p in top[1]]
    with httpx.Client(base_url=up.url, headers={"Authorization": f"Bearer {up.admin_key}"}) as raw:
        api = raw.post(f"/v1/models/{model.id}/predict", params={"top_k": 2},
                       files=[("files", (image.name, image.read_bytes()))]).json()
    # The same answer as the API gives directly (batched differently: floats may differ a bit).
    assert [p["label"] for p in api["predictions"][0]] == [p["label"] for p in top[0]]
    assert api["predictions"][0][0]["score"] == pytest.approx(top[0][0]["score"], abs=1e-5)
    saved = model.download(tmp_path / "out" / "model.zip")
    with zipfile.ZipFile(saved) as bundle:
        assert any(name.endswith(WEIGHTS_FILE) for name in bundle.namelist())
    assert not list((tmp_path / "out").glob(".*"))  # no partial file left behind
    assert "accuracy" in model.evaluation()["val"]
    assert model.set_alias("production").aliases == ["production"]
    assert client.models.get(f"{model.name}:production").id == model.id


def test_errors_are_exceptions_with_the_apis_detail(client, dataset, up):
    with pytest.raises(ApiError) as bad_spec:
        client.jobs.create(dataset, {"epochs": 0})
    assert bad_spec.value.status == 422
    assert ["spec", "epochs"] in [e["loc"] for e in bad_spec.value.errors]
    with pytest.raises(ApiError) as missing:
        client.jobs.get("no-such-job")
    assert missing.value.status == 404 and missing.value.detail
    with Client(up.url, "ftk_wrong") as stranger, pytest.raises(ApiError) as denied:
        next(iter(stranger.datasets.list()))
    assert denied.value.status == 401


def test_wait_raises_when_the_job_does_not_succeed(client, dataset):
    # Valid, but no machine holds it: the worker's memory estimate refuses it.
    job = client.jobs.create(dataset, image_size=1024, batch_size=4096,
                             freeze={"strategy": "none"})
    with pytest.raises(JobFailed) as failed:
        job.wait(timeout=180)
    assert failed.value.job["status"] == "failed" and failed.value.job["error"]
    assert f"job {job.id} ended failed: this run needs" in str(failed.value)


def test_a_missing_path_is_refused_before_anything_is_sent(client, tmp_path):
    with pytest.raises(Exception, match="no such file or folder"):
        client.datasets.upload(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no files to upload"):
        client.datasets.upload(empty)



def test_a_sweep_runs_streams_and_promotes_through_the_client(client, dataset):
    sweep = client.sweeps.create(dataset, {"head.dropout": {"uniform": [0.0, 0.5]}},
                                 {**FAST, "epochs": 2}, n_trials=2, parallelism=1,
                                 pruner="none", model_name="client-sweep")
    kinds = [(event.kind, event.data.get("status")) for event in sweep.stream()]
    assert kinds[-1] == ("status", "succeeded")
    assert sum(kind == "trial" and status == "succeeded" for kind, status in kinds) == 2
    sweep.refresh()
    assert sweep.done and len(sweep.trials) == 2 and sweep.best_trial is not None
    promoted = sweep.promote("top")
    assert promoted["alias"] == "client-sweep:top"
    assert client.models.get("client-sweep:top").id == sweep.best_trial["model_id"]
    with pytest.raises(ApiError) as bad:
        client.sweeps.create(dataset, {"optimizer.nope": {"uniform": [0, 1]}})
    assert bad.value.status == 422 and bad.value.errors[0]["loc"][-1] == "optimizer.nope"


def test_a_multi_label_dataset_trains_and_predicts_label_sets_through_client_and_cli(
        client, multilabel_folder, up, tmp_path):
    import os
    import subprocess

    from ftune.processes import ftune_command

    dataset = client.datasets.upload(multilabel_folder, name="mosaics")
    assert dataset.task == "multi_label" and dataset.classes == ["animal0", "animal1", "digit2"]
    job = client.jobs.create(dataset, FAST, epochs=3)
    job.wait(timeout=240)
    model = job.model()
    assert model.task == "multi_label"
    image = sorted((multilabel_folder / "test").glob("*.png"))[0]
    (entry,) = model.predict([image])
    assert set(entry) == {"labels", "scores"} and len(entry["scores"]) == 3
    env = {**os.environ, "FTUNE_URL": up.url, "FTUNE_API_KEY": up.admin_key,
           "FTUNE_REMOTE_CONFIG": str(tmp_path / "remote.json")}
    printed = subprocess.run(ftune_command("remote", "models", "predict", model.id, str(image)),
                             env=env, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.startswith(f"{image}: [{', '.join(entry['labels'])}] ")
    assert all(s["label"] in printed.stdout for s in entry["scores"])


def test_a_prediction_is_explained_through_client_and_cli(client, dataset, tiny_folder, up,
                                                          tmp_path):
    import io
    import os
    import subprocess

    from PIL import Image

    from ftune.processes import ftune_command

    job = client.jobs.create(dataset, {**FAST, "image_size": 64}, epochs=1)
    job.wait(timeout=180)
    model = job.model()
    image = next(tiny_folder.rglob("*.png"))
    (why,) = model.explain([image])
    assert why["label"] == why["prediction"][0]["label"]  # the top class is explained
    assert len(why["heatmap"]) == 2 and all(len(row) == 2 for row in why["heatmap"])  # 64/32
    assert max(max(row) for row in why["heatmap"]) == pytest.approx(1.0)
    assert Image.open(io.BytesIO(why["overlay_png"])).size == (64, 64)
    env = {**os.environ, "FTUNE_URL": up.url, "FTUNE_API_KEY": up.admin_key,
           "FTUNE_REMOTE_CONFIG": str(tmp_path / "remote.json")}
    printed = subprocess.run(ftune_command("remote", "models", "predict", model.id, str(image),
                                           "--explain", str(tmp_path / "why")),
                             env=env, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    saved = tmp_path / "why" / f"{image.stem}.explain.png"
    assert saved.read_bytes() == why["overlay_png"]
    assert printed.stdout.startswith(f"{image}: {why['label']} -> {saved}")


def test_suggestions_and_a_new_version_through_the_client(client, dataset, tmp_path,
                                                          animal_arrays):
    from PIL import Image

    from ftune.testing.realdata import balanced_indices

    images, labels = animal_arrays
    pool = tmp_path / "pool"
    pool.mkdir()
    truth = {}
    for i, index in enumerate(balanced_indices(labels, 2, offset=200, classes=3)):
        Image.fromarray(images[index]).save(pool / f"p{i}.png")
        truth[f"p{i}.png"] = f"animal{int(labels[index])}"
    unlabeled = client.datasets.upload(pool, name="pool", kind="unlabeled")
    model = client.jobs.create(dataset, FAST, epochs=1).wait(timeout=180).model()
    job = model.suggest(unlabeled, count=3).wait(timeout=120)
    picks = job.raw["suggestions"]
    assert job.status == "succeeded" and len(picks) == 3
    # The client zips the folder under its own name: paths are "pool/p0.png".
    chosen = {p["path"]: truth[p["path"].rsplit("/", 1)[-1]] for p in picks[:2]}
    version = client.datasets.new_version(dataset, unlabeled=unlabeled, labels=chosen)
    assert version.raw["parent_id"] == dataset.id and version.raw["added"]["images"] == 2
    assert version.num_images == dataset.num_images + 2
