"""Dataset upload and management through the API: formats, bad input, hostile archives."""

from __future__ import annotations

import io
import tarfile
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from ftune.testing.archives import tar_folder, tar_with, zip_folder, zip_members
from ftune.testing.blobs import stored_dataset, tar_names
from tests.service.conftest import MAX_UPLOAD_MB


def _upload(client, payload: bytes, filename: str = "data.zip", dedupe: bool = True, **data):
    return client.post("/v1/datasets", files={"file": (filename, payload)}, data=data or None,
                       params=None if dedupe else {"dedupe": "false"})


def _leftovers(home) -> list:
    """Anything an upload left behind: partial uploads or unpacking folders."""
    return list((home / "uploads").iterdir()) + [
        p for p in (home / "datasets").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_each_archive_kind_is_recognised_by_content(client, tiny_folder, tiny_dataset, kind):
    payload = {"zip": lambda: zip_folder(tiny_folder, prefix="top/"),
               "tar": lambda: tar_folder(tiny_folder, mode="w"),
               "tar.gz": lambda: tar_folder(tiny_folder)}[kind]()
    # A misleading file name: the kind comes from the bytes.
    response = _upload(client, payload, filename="upload.bin", dedupe=False)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["classes"] == ["animal0", "animal1", "animal2"]
    assert body["num_images"] == 36 and body["deduplicated"] is False
    assert body["class_counts"]["train"] == {"animal0": 12, "animal1": 12, "animal2": 12}
    # 28-pixel silhouettes: a warning that says what to do, never a block.
    assert body["report"]["ok"] and body["report"]["warnings"][0]["code"] == "small_images"
    assert body["warnings"] == [f"{w['message']}. {w['action']}"
                                for w in body["report"]["warnings"]]
    assert client.get(f"/v1/datasets/{body['id']}/report").json() == body["report"]
    # Same images and labels in any archive kind or order: the same content hash.
    assert body["content_hash"] == tiny_dataset["content_hash"]
    assert client.delete(f"/v1/datasets/{body['id']}").status_code == 204


def test_the_same_content_again_returns_the_existing_dataset(client, tiny_folder, tiny_dataset):
    response = _upload(client, tar_folder(tiny_folder, prefix="renamed/"), filename="again.tgz")
    assert response.status_code == 200
    assert response.json()["id"] == tiny_dataset["id"] and response.json()["deduplicated"]
    forced = _upload(client, zip_folder(tiny_folder), dedupe=False)
    assert forced.status_code == 201 and forced.json()["id"] != tiny_dataset["id"]
    assert client.delete(f"/v1/datasets/{forced.json()['id']}").status_code == 204
    assert client.get(f"/v1/datasets/{tiny_dataset['id']}").status_code == 200


def test_train_and_val_folders_are_kept_as_splits(client, tiny_folder, tmp_path):
    members = {}
    for path in sorted(tiny_folder.rglob("*.png")):
        split = "val" if int(path.stem) % 4 == 0 else "train"
        members[f"{split}/{path.parent.name}/{path.name}"] = path.read_bytes()
    members["train/animal0/notes.txt"] = b"not an image"
    body = _upload(client, zip_members(members), filename="split.zip").json()
    assert body["splits"]["train"] + body["splits"]["val"] == 36 and body["splits"]["val"] > 0
    assert set(body["class_counts"]) == {"train", "val"}
    ignored = body["report"]["info"][0]
    assert ignored["code"] == "ignored_files"
    assert ignored["items"] == [{"path": "train/animal0/notes.txt", "reason": "not an image"}]
    assert body["name"] == "split"
    assert client.delete(f"/v1/datasets/{body['id']}").status_code == 204


def test_delete_removes_row_and_files(client, tiny_folder, service_home):
    body = _upload(client, zip_folder(tiny_folder), filename="x.zip", dedupe=False).json()
    stored = stored_dataset(service_home, body["id"])
    assert stored.is_file()
    assert client.delete(f"/v1/datasets/{body['id']}").status_code == 204
    assert client.get(f"/v1/datasets/{body['id']}").status_code == 404
    assert not stored.exists() and not stored.parent.exists()
    assert client.delete(f"/v1/datasets/{body['id']}").status_code == 404


def test_custom_name_is_validated(client, tiny_folder):
    response = _upload(client, zip_folder(tiny_folder), filename="a.zip", name="")
    assert response.status_code == 422 and "name" in response.json()["detail"]
    body = _upload(client, zip_folder(tiny_folder), filename="a.zip", dedupe=False,
                   name="my photos").json()
    assert body["name"] == "my photos"
    assert client.delete(f"/v1/datasets/{body['id']}").status_code == 204


@pytest.mark.parametrize(("payload", "needle"), [
    (b"", "empty"),
    (b"this is plainly not an archive" * 20, "not a zip, tar or tar.gz"),
    (b"\x1f\x8b\x08\x00garbage-after-gzip-magic", "damaged"),
    (zip_members({"a/b.txt": b"x"})[:40], "damaged"),
    (b"PK\x05\x06" + b"\0" * 18, "no files"),  # a valid, empty zip
])
def test_unreadable_uploads_are_422_and_leave_nothing(client, service_home, payload, needle):
    before = {p.name for p in (service_home / "datasets").iterdir()}
    response = _upload(client, payload)
    assert response.status_code == 422, response.text
    assert needle in response.json()["detail"]
    assert {p.name for p in (service_home / "datasets").iterdir()} == before
    assert _leftovers(service_home) == []


def test_truncated_tar_gz_is_422(client, tiny_folder, service_home):
    payload = tar_folder(tiny_folder)
    response = _upload(client, payload[: len(payload) // 2])
    assert response.status_code == 422 and "damaged or truncated" in response.json()["detail"]
    assert _leftovers(service_home) == []


def test_dataset_problems_are_422_with_the_whole_report(client, tiny_folder, service_home):
    one_class = {f"only/{p.name}": p.read_bytes()
                 for p in sorted((tiny_folder / "animal0").iterdir())}
    response = _upload(client, zip_members(one_class))
    assert response.status_code == 422
    # The lone folder of images is the class, not a wrapper around loose files.
    assert "found one class (only)" in response.json()["detail"]
    report = response.json()["report"]
    assert not report["ok"] and report["errors"][0]["code"] == "too_few_classes"
    assert report["errors"][0]["action"]
    junk = {"a/x.png": b"not really a png", "b/y.png": b"nor this"}
    codes = {e["code"] for e in _upload(client, zip_members(junk)).json()["report"]["errors"]}
    assert {"nothing_decodable", "too_few_images"} <= codes
    lonely = dict(one_class)
    lonely["rare/0.png"] = (tiny_folder / "animal1").glob("*.png").__next__().read_bytes()
    response = _upload(client, zip_members(lonely))
    assert response.status_code == 422
    error = response.json()["report"]["errors"][0]
    assert error["code"] == "too_few_images" and error["items"] == [{"class": "rare",
                                                                     "images": 1}]
    assert _leftovers(service_home) == []


def test_csv_manifest_upload(client, tiny_folder):
    members, rows = {}, ["path,label"]
    for path in sorted(tiny_folder.rglob("*.png")):
        members[f"images/{path.name}"] = path.read_bytes()
        rows.append(f"images/{path.name},{path.parent.name.upper()}")
    members["labels.csv"] = ("\n".join(rows) + "\n").encode()
    body = _upload(client, zip_members(members), filename="manifest.zip").json()
    assert body["report"]["layout"] == "csv_manifest"
    assert body["classes"] == ["ANIMAL0", "ANIMAL1", "ANIMAL2"] and body["num_images"] == 36
    assert client.delete(f"/v1/datasets/{body['id']}").status_code == 204


def test_a_multi_label_upload_names_its_task_and_counts_positives(client, multilabel_folder,
                                                                  tiny_dataset):
    body = _upload(client, zip_folder(multilabel_folder), filename="mosaics.zip").json()
    assert body["task"] == "multi_label" and body["report"]["task"] == "multi_label"
    assert body["classes"] == ["animal0", "animal1", "digit2"]
    assert body["num_images"] == 120 and body["splits"]["train"] == 90
    positives = body["class_counts"]["train"]
    assert sum(positives.values()) > 90  # some mosaics carry several labels
    assert body["report"]["label_sets"]["cardinality"] > 1
    assert client.get(f"/v1/datasets/{body['id']}").json()["task"] == "multi_label"
    assert client.get(f"/v1/datasets/{tiny_dataset['id']}").json()["task"] == "single_label"
    assert client.delete(f"/v1/datasets/{body['id']}").status_code == 204


def test_a_decompression_bomb_image_is_skipped_before_decoding(client, tiny_folder):
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, "PNG")  # 144 Mpx in a few kB
    members = {f"{p.parent.name}/{p.name}": p.read_bytes()
               for p in sorted(tiny_folder.rglob("*.png"))}
    members["animal0/bomb.png"] = bomb.getvalue()
    body = _upload(client, zip_members(members), dedupe=False).json()
    corrupt = next(w for w in body["report"]["warnings"] if w["code"] == "corrupt_files")
    assert corrupt["items"][0]["path"] == "animal0/bomb.png"
    assert "too many pixels" in corrupt["items"][0]["reason"]
    assert body["num_images"] == 36
    assert client.delete(f"/v1/datasets/{body['id']}").status_code == 204


def test_concurrent_uploads_do_not_interfere(client, animal_folder, service_home):
    payloads = []
    for k in range(4):  # four different datasets: k+2 classes each
        members = {f"{c.name}/{p.name}": p.read_bytes()
                   for c in sorted(animal_folder.iterdir())[: k + 2]
                   for p in sorted(c.iterdir())[:6]}
        payloads.append(zip_members(members))
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda p: _upload(client, p, dedupe=False), payloads))
    assert [r.status_code for r in responses] == [201] * 4
    for k, response in enumerate(responses):
        body = response.json()
        assert len(body["classes"]) == k + 2 and body["num_images"] == 6 * (k + 2)
        names = tar_names(stored_dataset(service_home, body["id"]))
        assert len([n for n in names if n.endswith(".png")]) == 6 * (k + 2)
        assert client.delete(f"/v1/datasets/{body['id']}").status_code == 204
    assert _leftovers(service_home) == []


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize("name", ["../escape.png", "/etc/evil.png", "C:/evil.png",
                                  "a/../../evil.png"])
def test_path_traversal_is_refused(client, service_home, name, kind):
    if kind == "zip":
        payload = zip_members({"cats/ok.png": b"x", name: b"evil"})
    else:
        payload = tar_with([tarfile.TarInfo("cats/ok.png"), tarfile.TarInfo(name)],
                           {"cats/ok.png": b"x", name: b"evil"})
    response = _upload(client, payload)
    assert response.status_code == 422
    assert "absolute path" in response.json()["detail"] or "outside" in response.json()["detail"]
    assert not (service_home / "escape.png").exists()
    assert not (service_home.parent / "evil.png").exists()
    assert _leftovers(service_home) == []


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE])
def test_links_and_devices_in_tar_are_refused(client, service_home, kind):
    link = tarfile.TarInfo("cats/link.png")
    link.type = kind
    link.linkname = "/etc/passwd"
    response = _upload(client, tar_with([tarfile.TarInfo("cats/a.png"), link],
                                        {"cats/a.png": b"x"}))
    assert response.status_code == 422
    assert "link" in response.json()["detail"] or "device" in response.json()["detail"]
    assert _leftovers(service_home) == []


def test_upload_over_the_limit_is_413(client, service_home):
    payload = b"\0" * (MAX_UPLOAD_MB * 2**20 + 1)
    response = _upload(client, payload)
    assert response.status_code == 413 and "FTUNE_MAX_UPLOAD_MB" in response.json()["detail"]
    assert _leftovers(service_home) == []


def test_request_shape_errors(client):
    assert client.post("/v1/datasets", json={"file": "x"}).status_code == 415
    response = client.post("/v1/datasets", files={"other": ("a.zip", b"x")})
    assert response.status_code == 422 and "unexpected file field" in response.json()["detail"]
    response = client.post("/v1/datasets", data={"name": "n"},
                           files={"ignored": (None, b"just a field")})
    assert response.status_code == 422 and "file: missing" in response.json()["detail"]
    assert client.get("/v1/datasets/0123456789abcdef0123456789abcdef").status_code == 404
    assert client.get("/v1/datasets/../../etc").status_code == 404


def test_images_sent_one_by_one_get_told_to_send_one_archive(client, tiny_folder, service_home):
    images = sorted((tiny_folder / "animal0").iterdir())[:3]
    response = client.post("/v1/datasets",
                           files=[("file", (p.name, p.read_bytes())) for p in images])
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "one archive" in detail and "zip -r" in detail and "-F file=@" in detail
    assert response.json()["errors"][0]["loc"] == ["file"]
    assert _leftovers(service_home) == []


def test_the_archive_may_come_as_files_too(client, tiny_folder, tiny_dataset):
    # `files` is /predict's field name; uploads accept it as well as `file`.
    response = client.post("/v1/datasets", files={"files": ("t.zip", zip_folder(tiny_folder))})
    assert response.status_code in (200, 201) and response.json()["id"]


def test_a_broken_multipart_body_is_422(client):
    body = b"--XYZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.zip\"\r\n\r\nab"
    response = client.post("/v1/datasets", content=body,
                           headers={"content-type": "multipart/form-data; boundary=XYZ"})
    assert response.status_code == 422 and "incomplete" in response.json()["detail"]


def test_existing_datasets_survive_rejected_uploads(client, tiny_dataset, service_home):
    stored = stored_dataset(service_home, tiny_dataset["id"])
    bytes_before = stored.read_bytes()
    assert tar_names(stored)  # the images are there
    _upload(client, zip_members({"../x.png": b"x"}))
    _upload(client, b"junk")
    assert stored.read_bytes() == bytes_before
    stored = client.get(f"/v1/datasets/{tiny_dataset['id']}").json()
    assert stored == {k: v for k, v in tiny_dataset.items() if k not in ("report",
                                                                        "deduplicated")}


def test_chunked_upload_over_the_limit_is_cut_off_while_streaming(client, service_home):
    # No Content-Length: the limit is enforced on the bytes as they arrive.
    def body():
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n\r\n'
        for _ in range(MAX_UPLOAD_MB + 2):
            yield b"\0" * 2**20
        yield b"\r\n--B--\r\n"

    response = client.post("/v1/datasets", content=body(),
                           headers={"content-type": "multipart/form-data; boundary=B"})
    assert response.status_code == 413
    assert _leftovers(service_home) == []
