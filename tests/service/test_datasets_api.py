"""Dataset upload and management through the API: formats, bad input, hostile archives."""

from __future__ import annotations

import tarfile

import pytest

from tests.archives import tar_folder, tar_with, zip_folder, zip_members
from tests.service.conftest import MAX_UPLOAD_MB


def _upload(client, payload: bytes, filename: str = "data.zip", **data):
    return client.post("/v1/datasets", files={"file": (filename, payload)}, data=data or None)


def _leftovers(home) -> list:
    """Anything an upload left behind: partial uploads or unpacking folders."""
    return list((home / "uploads").iterdir()) + [
        p for p in (home / "datasets").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_each_archive_kind_is_recognised_by_content(client, tiny_folder, kind):
    payload = {"zip": lambda: zip_folder(tiny_folder, prefix="top/"),
               "tar": lambda: tar_folder(tiny_folder, mode="w"),
               "tar.gz": lambda: tar_folder(tiny_folder)}[kind]()
    # A misleading file name: the kind comes from the bytes.
    response = _upload(client, payload, filename="upload.bin")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["classes"] == ["animal0", "animal1", "animal2"]
    assert body["num_images"] == 36 and body["warnings"] == []
    assert body["class_counts"]["train"] == {"animal0": 12, "animal1": 12, "animal2": 12}
    assert client.delete(f"/v1/datasets/{body['id']}").status_code == 204


def test_train_and_val_folders_are_kept_as_splits(client, tiny_folder, tmp_path):
    members = {}
    for path in sorted(tiny_folder.rglob("*.png")):
        split = "val" if int(path.stem) % 4 == 0 else "train"
        members[f"{split}/{path.parent.name}/{path.name}"] = path.read_bytes()
    members["train/animal0/notes.txt"] = b"not an image"
    body = _upload(client, zip_members(members), filename="split.zip").json()
    assert body["splits"]["train"] + body["splits"]["val"] == 36 and body["splits"]["val"] > 0
    assert set(body["class_counts"]) == {"train", "val"}
    assert any("notes.txt" in w for w in body["warnings"])
    assert body["name"] == "split"


def test_delete_removes_row_and_files(client, tiny_folder, service_home):
    body = _upload(client, zip_folder(tiny_folder), filename="x.zip").json()
    folder = service_home / "datasets" / body["id"]
    assert folder.is_dir()
    assert client.delete(f"/v1/datasets/{body['id']}").status_code == 204
    assert client.get(f"/v1/datasets/{body['id']}").status_code == 404
    assert not folder.exists()
    assert client.delete(f"/v1/datasets/{body['id']}").status_code == 404


def test_custom_name_is_validated(client, tiny_folder):
    response = _upload(client, zip_folder(tiny_folder), filename="a.zip", name="")
    assert response.status_code == 422 and "name" in response.json()["detail"]
    assert _upload(client, zip_folder(tiny_folder), filename="a.zip",
                   name="my photos").json()["name"] == "my photos"


@pytest.mark.parametrize(("payload", "needle"), [
    (b"", "empty"),
    (b"this is plainly not an archive" * 20, "not a zip, tar or tar.gz"),
    (b"\x1f\x8b\x08\x00garbage-after-gzip-magic", "damaged"),
    (zip_members({"a/b.txt": b"x"})[:40], "damaged"),
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


def test_dataset_problems_are_422_naming_them(client, tiny_folder):
    one_class = {f"only/{p.name}": p.read_bytes()
                 for p in sorted((tiny_folder / "animal0").iterdir())}
    response = _upload(client, zip_members(one_class))
    assert response.status_code == 422 and "at least 2 class folders" in response.json()["detail"]
    junk = {"a/x.png": b"not really a png", "b/y.png": b"nor this"}
    response = _upload(client, zip_members(junk))
    assert response.status_code == 422 and "no usable images" in response.json()["detail"]


@pytest.mark.parametrize("name", ["../escape.png", "/etc/evil.png", "C:/evil.png",
                                  "a/../../evil.png"])
def test_path_traversal_in_zip_is_refused(client, service_home, name):
    payload = zip_members({"cats/ok.png": b"x", name: b"evil"})
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


def test_a_broken_multipart_body_is_422(client):
    body = b"--XYZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.zip\"\r\n\r\nab"
    response = client.post("/v1/datasets", content=body,
                           headers={"content-type": "multipart/form-data; boundary=XYZ"})
    assert response.status_code == 422 and "incomplete" in response.json()["detail"]


def test_existing_datasets_survive_rejected_uploads(client, tiny_dataset, service_home):
    folder = service_home / "datasets" / tiny_dataset["id"]
    files_before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    _upload(client, zip_members({"../x.png": b"x"}))
    _upload(client, b"junk")
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == files_before
    assert client.get(f"/v1/datasets/{tiny_dataset['id']}").json() == tiny_dataset


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
