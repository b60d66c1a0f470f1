"""Names and ids a client chose are data, never syntax: no pattern lets a trailing newline
through, and plots draw class names literally (mathtext would fail on them)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from ftune.service.ids import is_id, new_id
from ftune.service.plots import confusion_png, curves_png
from ftune.service.tuned_models import ALIAS

HOSTILE_NAMES = [r"$\nosuchcmd$", "$" + "{" * 500 + "x" + "}" * 500 + "$", "$x^{2$", r"\$$_",
                 "a" * 300, "éè 猫 🐈"]


def test_ids_must_match_whole():
    good = new_id()
    assert is_id(good)
    for bad in (good + "\n", good + "\r\n", "\n" + good, good.upper(), good[:-1], ""):
        assert not is_id(bad), repr(bad)
    assert ALIAS.fullmatch("prod\n") is None


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_plots_draw_hostile_class_names_literally(name):
    classes = [name, "cat"]
    png = confusion_png([[3, 1], [0, 4]], classes, title=f"model {name}")
    assert Image.open(io.BytesIO(png)).format == "PNG"
    curves = curves_png([{"epoch": 1, "train_loss": 1.0, "val_accuracy": 0.5}], title=name)
    assert Image.open(io.BytesIO(curves)).format == "PNG"


def test_an_id_with_a_trailing_newline_is_an_unknown_id(client):
    job_id = new_id()
    for path in (f"/v1/jobs/{job_id}%0A", f"/v1/datasets/{job_id}%0A", f"/v1/models/{job_id}%0A"):
        response = client.get(path)
        assert response.status_code == 404, (path, response.text)
