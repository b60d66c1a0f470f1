"""ONNX and TorchScript exports run in a child process, a bounded number at a time, and a
child that takes too long is killed without leaving a partial file."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import psutil
import pytest

from ftune.service.errors import Unavailable
from ftune.service.exports import ExportSlots, export_in_child


def _model_folder(service_home: Path, model: dict) -> Path:
    return service_home / "models" / model["id"]


def test_an_export_is_built_by_a_child_of_the_api(client, tiny_model, stack):
    api = psutil.Process(stack.named("api")[0].pid)
    seen: list[list[str]] = []
    finished = threading.Event()

    def watch() -> None:  # the export child appears under the API process
        while not finished.is_set():
            for child in api.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    seen.append(child.cmdline())
            finished.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        response = client.get(f"/v1/models/{tiny_model['id']}/download?format=torchscript")
    finally:
        finished.set()
        watcher.join()
    assert response.status_code == 200 and len(response.content) > 1000
    assert any("ftune.models.cli" in c and "export" in c for c in seen), seen[:5]


def test_exports_beyond_the_slots_are_told_to_come_back(tmp_path):
    slots = ExportSlots(1)
    with slots.slot(), pytest.raises(Unavailable) as refused:
        slots.run(tmp_path, tmp_path / "m.onnx", "onnx", timeout_s=60)
    assert refused.value.status_code == 503
    assert int(refused.value.headers["Retry-After"]) > 0
    assert "export slot" in refused.value.detail


def test_a_slow_export_is_killed_and_leaves_nothing(service_home, tiny_model, tmp_path):
    target = tmp_path / "model.onnx"
    with pytest.raises(Unavailable, match="FTUNE_EXPORT_TIMEOUT_S"):
        export_in_child(_model_folder(service_home, tiny_model), target, "onnx", timeout_s=0.3)
    assert list(tmp_path.iterdir()) == []
