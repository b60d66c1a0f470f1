"""ONNX Runtime serving: the fp32 export checked against the torch model on the model's own
images, and int8 offered only where its guard passes (tested both ways)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from ftune.models.bundle import save_bundle
from ftune.models.cli import main
from ftune.models.predictor import Predictor
from ftune.models.serving.agreement import Agreement, agreement
from ftune.models.serving.batch_size import (
    BATCH_SIZES,
    choose_size,
    measure_model_batch_sizes,
)
from ftune.models.serving.lanes import LaneLayout, lane_layout
from ftune.models.serving.onnx_runner import OnnxRunner
from ftune.models.serving.prepare import int8_passes, parity_passes, prepare_serving
from ftune.models.training.fit import fit


@pytest.fixture(scope="module")
def tuned(animal_folder, tmp_path_factory):
    result = fit(animal_folder, {"image_size": 48, "epochs": 2, "batch_size": 32,
                                 "optimizer": {"name": "adam", "lr": 0.003}})
    return save_bundle(result, tmp_path_factory.mktemp("serving") / "model")


@pytest.fixture(scope="module")
def prepared(tuned, animal_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    return out, prepare_serving(tuned, animal_folder, out)


def test_the_onnx_export_passes_parity_on_the_model_s_own_images(prepared, tuned):
    out, report = prepared
    onnx_check = report["onnx"]
    assert onnx_check["passed"], onnx_check["why"]
    assert onnx_check["images"] == 64 and onnx_check["agreement"] == 1.0
    assert onnx_check["max_prob_diff"] <= 1e-3
    assert "val split (carved from train as training carved it)" in onnx_check["why"]
    assert json.loads((out / "serving.json").read_text()) == report
    # The runner gives what Predictor gives, through the same uint8 input.
    predictor = Predictor.load(tuned, device="cpu")
    batch = torch.randint(0, 256, (5, 3, 48, 48), dtype=torch.uint8)
    got = OnnxRunner(out / "model.onnx", threads=1)(batch.numpy())
    assert np.abs(got - predictor.probabilities(batch).numpy()).max() <= 1e-4


def test_the_batch_size_served_is_measured_and_chunks_give_the_whole_batch_s_answer(
        prepared, tuned):
    out, report = prepared
    batch = report["onnx"]["batch"]
    runner = OnnxRunner(out / "model.onnx", threads=1)
    assert batch["provider"] == runner.providers[0] == "CPUExecutionProvider"
    assert set(batch["images_per_s"]) == {str(size) for size in BATCH_SIZES}
    assert all(rate > 0 for rate in batch["images_per_s"].values())
    assert batch["size"] in BATCH_SIZES
    assert ("batch" in report["int8"]) == report["int8"]["offered"]
    layout = lane_layout("cpu")
    assert (batch["lanes"], batch["threads"]) == (layout.lanes, layout.threads)
    assert runner.batch_size({**batch, "size": 3}, layout) == 3
    # Measured with another execution provider, or other lanes: not this host's size.
    assert runner.batch_size({**batch, "provider": "CUDAExecutionProvider"}, layout) is None
    assert runner.batch_size({**batch, "size": 3}, LaneLayout(3, 5, 15)) is None
    predictor = Predictor.load(tuned, device="cpu")
    arrays = np.random.default_rng(0).integers(0, 256, (7, 48, 48, 3), dtype=np.uint8)
    for engine in (None, runner):  # torch, then ONNX Runtime
        predictor.serve_with(engine, "any")
        whole = predictor.probabilities_from_arrays(arrays)
        predictor.serve_with(engine, "any", batch_size=3)
        chunked = predictor.probabilities_from_arrays(arrays)
        assert chunked.shape == whole.shape == (7, len(predictor.classes))
        assert (chunked - whole).abs().max() <= 1e-5


def test_torch_s_batch_size_is_measured_on_the_model_as_built_in_the_lanes(tuned):
    predictor = Predictor.load(tuned, device="cpu")
    layout = LaneLayout(lanes=2, threads=1, wide_threads=2)
    measured = measure_model_batch_sizes(predictor, layout, rounds=1, block_s=0.01)
    assert measured["provider"] == "torch-cpu" and measured["size"] in BATCH_SIZES
    assert (measured["lanes"], measured["threads"]) == (2, 1)
    assert set(measured["images_per_s"]) == {str(size) for size in BATCH_SIZES}


def test_lanes_split_the_cores_and_a_gpu_has_one():
    assert lane_layout("cpu", cores=2) == LaneLayout(lanes=2, threads=1, wide_threads=2)
    assert lane_layout("cpu", cores=16) == LaneLayout(lanes=4, threads=4, wide_threads=16)
    assert lane_layout("cpu", lanes=1, cores=16) == LaneLayout(1, 16, 16)
    assert lane_layout("cpu", lanes=8, cores=2) == LaneLayout(2, 1, 2)  # no more than cores
    assert lane_layout("cuda:0", cores=16) == LaneLayout(1, 16, 16)
    assert LaneLayout(2, 1, 2).widths == (2, 1) and LaneLayout(1, 8, 8).widths == (8,)


def test_one_onnx_model_runs_with_each_thread_count_it_is_given(prepared):
    out, _ = prepared
    runner = OnnxRunner(out / "model.onnx", threads=(2, 1))
    assert sorted(runner.sessions) == [1, 2] and runner.default == 2
    batch = np.random.default_rng(1).integers(0, 256, (3, 3, 48, 48), dtype=np.uint8)
    assert np.abs(runner(batch, 1) - runner(batch)).max() <= 1e-5
    assert runner.memory_bytes() == 2 * (out / "model.onnx").stat().st_size


def test_the_fastest_batch_size_wins_only_by_a_margin():
    assert choose_size({1: 100.0, 4: 104.0, 16: 90.0}) == 1
    assert choose_size({1: 100.0, 4: 130.0, 16: 120.0}) == 4
    assert choose_size({1: 50.0, 16: 400.0}) == 16


def test_int8_is_quantized_statically_and_judged_against_fp32(prepared):
    out, report = prepared
    int8 = report["int8"]
    assert int8["metric"] == "accuracy" and 0 < int8["images"] <= 1000
    assert 0.0 <= int8["agreement"] <= 1.0 and "within 0.5 points" in int8["why"]
    assert int8["offered"] == int8_passes(
        Agreement(int8["images"], int8["agreement"], int8["max_prob_diff"]),
        int8["fp32_quality"] - int8["quality"])
    if int8["offered"]:
        model = onnx.load(str(out / "model.int8.onnx"))
        ops = {node.op_type for node in model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ, static
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["precision"] == "int8" and json.loads(meta["classes"])
    else:
        assert not (out / "model.int8.onnx").exists()


def test_the_guards_refuse_what_drifts():
    exact = Agreement(images=100, agreement=1.0, max_prob_diff=2e-6)
    assert parity_passes(exact)
    assert not parity_passes(Agreement(100, 0.99, 2e-6))  # one image's answer changed
    assert not parity_passes(Agreement(100, 1.0, 0.01))  # probabilities moved
    assert int8_passes(Agreement(1000, 0.995, 0.05), drop=0.004)
    assert not int8_passes(Agreement(1000, 0.985, 0.05), drop=0.0)  # answers changed
    assert not int8_passes(Agreement(1000, 0.995, 0.05), drop=0.006)  # accuracy fell


def test_agreement_counts_top_classes_or_label_sets():
    ref = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]], dtype=np.float32)
    other = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]], dtype=np.float32)
    assert agreement(ref, other).agreement == pytest.approx(2 / 3)
    thresholds = np.array([0.5, 0.75], dtype=np.float32)  # multi-label: sets at thresholds
    assert agreement(ref, other, thresholds).agreement == pytest.approx(1 / 3)


def test_without_its_dataset_nothing_is_offered(tuned, tmp_path, capsys):
    assert main(["serving-check", str(tuned), "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert not report["onnx"]["passed"] and not report["int8"]["offered"]
    assert "no longer stored" in report["onnx"]["why"]


PASSED = {"onnx": {"passed": True, "why": "same", "batch": {"size": 1}},
          "int8": {"offered": True, "why": "kept", "batch": {"size": 4}}}


@pytest.mark.parametrize(("policy", "report", "engine", "file"), [
    ("torch", PASSED, "torch", None),
    ("auto", None, "torch", None),  # not prepared yet: torch serves meanwhile
    ("auto", PASSED, "onnxruntime", "model.onnx"),
    ("int8", PASSED, "onnxruntime-int8", "model.int8.onnx"),
    ("int8", {**PASSED, "int8": {"offered": False, "why": "drop"}}, "onnxruntime",
     "model.onnx"),
    ("onnxruntime", PASSED, "onnxruntime", "model.onnx"),
    ("auto", {**PASSED, "onnx": {"passed": False, "why": "moved"}}, "torch", None),
    ("onnxruntime", {**PASSED, "onnx": {"passed": False, "why": "moved"}}, None, None),
])
def test_the_policy_and_the_checks_choose_the_engine(policy, report, engine, file):
    from ftune.models.serving.engines import choose

    choice = choose(policy, report)
    assert (choice.engine, choice.file) == (engine, file)
    # The batch size measured for the file that serves goes with it.
    assert choice.batch == {"model.onnx": {"size": 1}, "model.int8.onnx": {"size": 4},
                            None: None}[file]
    if report is not None and not report["onnx"]["passed"]:
        assert "failed its parity check: moved" in choice.why
