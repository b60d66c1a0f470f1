"""The export formats are one table: the engine's command, the API's route and the data
directory all read it, so a format cannot be known in one place and missing in another."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from ftune.models.cli import build_parser
from ftune.models.export_formats import (
    DEFAULT_FORMAT,
    EXPORT_FORMATS,
    TRACED_FORMATS,
    ExportFormat,
    export_suffix,
)
from ftune.service.blobs.keys import export_key, export_prefix
from ftune.service.storage import Storage


def test_the_names_and_the_table_cannot_drift():
    assert list(get_args(ExportFormat)) == list(EXPORT_FORMATS)
    assert DEFAULT_FORMAT in EXPORT_FORMATS and not EXPORT_FORMATS[DEFAULT_FORMAT].traced
    suffixes = [info.suffix for info in EXPORT_FORMATS.values()]
    assert len(set(suffixes)) == len(suffixes)  # one file per format


def test_the_export_command_offers_the_traced_formats():
    assert TRACED_FORMATS == ("torchscript", "onnx", "triton")
    parser = build_parser()
    for fmt in TRACED_FORMATS:
        assert parser.parse_args(["export", "m", "--format", fmt, "--out", "o"]).format == fmt
    with pytest.raises(SystemExit):  # the bundle zip is the API's, not a traced export
        parser.parse_args(["export", "m", "--format", "safetensors", "--out", "o"])


def test_the_download_route_offers_every_format():
    from ftune.service.routes.tuned_models import router

    route = next(r for r in router.routes if r.path.endswith("/download"))
    (param,) = (p for p in route.dependant.query_params if p.name == "format")
    assert list(get_args(param.field_info.annotation)) == list(EXPORT_FORMATS)


def test_the_store_keeps_a_download_of_each_format(tmp_path: Path):
    storage = Storage(tmp_path)
    model_id = "0" * 32
    for fmt in EXPORT_FORMATS:
        storage.blobs.put_chunks(export_key(model_id, fmt), [b"x"])
        assert storage.export_file(model_id, fmt).name.endswith(export_suffix(fmt))
    found = sorted(storage.blobs.keys(export_prefix(model_id)))
    assert [k.split("/")[-1] for k in found] == [
        "model.int8.onnx", "model.onnx", "model.pt", "model.triton.zip", "model.zip"]
    with pytest.raises(ValueError, match="unknown export format"):
        export_key(model_id, "pickle")
    with pytest.raises(ValueError, match="unknown export format"):
        export_suffix("pickle")


def test_the_table_loads_without_torch():
    code = "import sys\nimport ftune.models.export_formats\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert out.strip() == "False"


def test_the_light_clients_download_formats_are_the_tables():
    from ftune.client.cli import DOWNLOAD_FORMATS
    from ftune.models.export_formats import EXPORT_FORMATS

    assert set(DOWNLOAD_FORMATS) == set(EXPORT_FORMATS)
