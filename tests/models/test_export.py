"""Exports with parity: ONNX (onnxruntime) and TorchScript give Predictor's probabilities."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from ftune.models.bundle import save_bundle
from ftune.models.cli import main
from ftune.models.data.transforms import resize_center_crop
from ftune.models.export import export_model
from ftune.models.predictor import Predictor
from ftune.models.training.fit import fit


@pytest.fixture(scope="module")
def tuned(animal_folder, tmp_path_factory):
    result = fit(animal_folder, {"image_size": 48, "epochs": 2, "batch_size": 32,
                                 "optimizer": {"name": "adam", "lr": 0.003}})
    return save_bundle(result, tmp_path_factory.mktemp("export") / "model")


def _batch(predictor: Predictor, images: np.ndarray) -> tuple[list[Image.Image], np.ndarray]:
    pil = [Image.fromarray(a).convert("RGB") for a in images]
    size = predictor.preprocessing.input_size
    batch = torch.stack([resize_center_crop(im, predictor.preprocessing, size) for im in pil])
    return pil, batch.numpy()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exports_match_the_pytorch_model(tuned, animal_heldout, tmp_path, fmt):
    predictor = Predictor.load(tuned, device="cpu")
    images, _ = animal_heldout
    pil, batch = _batch(predictor, images[:40])
    expected = predictor.predict_proba(pil).numpy()
    path = export_model(tuned, tmp_path / f"model.{fmt}", fmt)
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["images"]
        got = session.run(None, {"images": batch})[0]
    else:
        with torch.no_grad():
            got = torch.jit.load(str(path))(torch.from_numpy(batch)).numpy()
    assert got.shape == expected.shape == (40, 10)
    assert np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()
    top1 = [p[0]["label"] for p in predictor.predict(pil, top_k=1)]
    assert [predictor.classes[i] for i in got.argmax(1)] == top1


def test_cli_export_and_bad_format(tuned, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(tuned), "--format", "onnx", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000 and not list(tmp_path.glob(".*"))
    with pytest.raises(ValueError, match="unknown export format"):
        export_model(tuned, tmp_path / "x", "tflite")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_exported_file_describes_itself(tuned, tmp_path, fmt):
    import json

    from ftune.models.export import EXTRA_FILE

    predictor = Predictor.load(tuned, device="cpu")
    path = export_model(tuned, tmp_path / f"model.{fmt}", fmt)
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
    else:
        extra = {EXTRA_FILE: ""}
        torch.jit.load(str(path), _extra_files=extra)
        meta = json.loads(extra[EXTRA_FILE])
    prep = predictor.preprocessing
    assert json.loads(meta["classes"]) == predictor.classes
    assert int(meta["input_size"]) == prep.input_size == 48
    assert int(meta["resize_size"]) == prep.resize_size
    assert json.loads(meta["mean"]) == pytest.approx(list(prep.mean))
    assert json.loads(meta["std"]) == pytest.approx(list(prep.std))
    assert meta["interpolation"] == prep.interpolation
    assert f"shorter side to {prep.resize_size} px" in meta["resize"]


def _pbtxt_tensors(config: str, block: str) -> list[dict[str, str]]:
    """The ``{ name: ..., data_type: ..., dims: [...] }`` entries of an input/output block."""
    import re

    body = re.search(rf"^{block} \[\n(.*?)\n\]", config, re.S | re.M)
    assert body is not None, f"no {block} block in config.pbtxt"
    return [dict(re.findall(r'(\w+): ("[^"]*"|\[[^\]]*\]|\w+)', entry))
            for entry in re.findall(r"\{([^}]*)\}", body.group(1))]


def test_a_triton_repository_matches_its_onnx_model(tuned, animal_heldout, tmp_path):
    """The zip is one model repository (config.pbtxt, 1/model.onnx, labels.txt), and the
    config's input and output names, types and shapes are the ONNX model's own."""
    import zipfile

    import onnx

    predictor = Predictor.load(tuned, device="cpu")
    path = export_model(tuned, tmp_path / "model.triton.zip", "triton", name="pets v2!")
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == [
            "pets_v2/1/model.onnx", "pets_v2/config.pbtxt", "pets_v2/labels.txt"]
        assert all(info.external_attr >> 16 == 0o100644 for info in archive.infolist())
        archive.extractall(tmp_path / "repo")
    folder = tmp_path / "repo" / "pets_v2"
    config = (folder / "config.pbtxt").read_text()
    assert 'name: "pets_v2"' in config and 'platform: "onnxruntime_onnx"' in config
    assert "max_batch_size: 32" in config and "dynamic_batching" in config
    assert (folder / "labels.txt").read_text().splitlines() == predictor.classes
    graph = onnx.load(str(folder / "1" / "model.onnx")).graph
    size = predictor.preprocessing.input_size
    (inp,), (out,) = _pbtxt_tensors(config, "input"), _pbtxt_tensors(config, "output")
    assert inp == {"name": f'"{graph.input[0].name}"', "data_type": "TYPE_UINT8",
                   "dims": f"[3, {size}, {size}]"}
    assert out["name"] == f'"{graph.output[0].name}"' and out["data_type"] == "TYPE_FP32"
    assert out["dims"] == f"[{len(predictor.classes)}]"
    assert out["label_filename"] == '"labels.txt"'
    # The model in the repository is the ONNX export: the same probabilities as Predictor.
    images, _ = animal_heldout
    pil, batch = _batch(predictor, images[:8])
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": batch})[0]
    assert np.abs(got - predictor.predict_proba(pil).numpy()).max() <= 1e-4
