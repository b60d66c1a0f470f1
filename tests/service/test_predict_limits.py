"""Predictions refuse what could exhaust the API: pixel bombs, formats we do not read, files
over the per-image limit; errors name the client's file, never a server path."""

from __future__ import annotations

import io

from PIL import Image


def _predict(client, model_id: str, name: str, data: bytes):
    return client.post(f"/v1/models/{model_id}/predict", files={"files": (name, data)})


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_a_pixel_bomb_is_refused_from_its_header(client, tiny_model, service_home):
    bomb = _png(Image.new("1", (12_000, 12_000)))  # ~17 kB, 144 Mpx: 800 MB decoded
    assert len(bomb) < 100_000
    response = _predict(client, tiny_model["id"], "bomb.png", bomb)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith("bomb.png: too many pixels (") and "downscale" in detail
    # The same in the warning band PIL would only warn about (89 M to 179 M pixels).
    band = _predict(client, tiny_model["id"], "band.png", _png(Image.new("1", (10_000, 9_500))))
    assert band.status_code == 422 and "too many pixels" in band.json()["detail"]


def test_formats_we_do_not_document_and_non_images_are_refused_by_name(client, tiny_model,
                                                                       service_home):
    pcx = io.BytesIO()
    Image.new("RGB", (40, 40)).save(pcx, "PCX")
    for name, data in (("photo.pcx", pcx.getvalue()), ("report.pdf", b"%PDF-1.7\n" + b"x" * 500)):
        response = _predict(client, tiny_model["id"], name, data)
        assert response.status_code == 422
        detail = response.json()["detail"]
        assert detail.startswith(f"{name}: not a JPEG, PNG, BMP, GIF, WebP or TIFF image")
        assert str(service_home) not in detail and ".part" not in detail


def test_the_per_image_limit_holds_for_each_file(client, tiny_model):
    small = _png(Image.new("RGB", (32, 32), (9, 9, 9)))
    big = b"\x89PNG" + b"\0" * (21 * 2**20)  # over FTUNE_MAX_PREDICT_IMAGE_MB (20)
    response = client.post(f"/v1/models/{tiny_model['id']}/predict",
                           files=[("files", ("ok.png", small)), ("files", ("huge.png", big))])
    assert response.status_code == 413
    assert "huge.png" in response.json()["detail"]
    assert "FTUNE_MAX_PREDICT_IMAGE_MB" in response.json()["detail"]
    assert _predict(client, tiny_model["id"], "ok.png", small).status_code == 200


def test_explanations_come_only_when_asked_and_only_for_a_few_images(client, tiny_model):
    from ftune.service.settings import Settings

    small = _png(Image.new("RGB", (40, 40), (90, 20, 200)))
    url = f"/v1/models/{tiny_model['id']}/predict"
    plain = client.post(url, files={"files": ("a.png", small)})
    assert plain.status_code == 200 and "explanations" not in plain.json()
    asked = client.post(url, params={"explain": "true"}, files={"files": ("a.png", small)})
    assert asked.status_code == 200, asked.text
    (why,) = asked.json()["explanations"]
    assert why["label"] == asked.json()["predictions"][0][0]["label"]
    limit = Settings().max_explain_images
    many = client.post(url, params={"explain": "true"},
                       files=[("files", (f"{i}.png", small)) for i in range(limit + 1)])
    assert many.status_code == 422
    assert "FTUNE_MAX_EXPLAIN_IMAGES" in many.json()["detail"]
    assert str(limit) in many.json()["detail"]
