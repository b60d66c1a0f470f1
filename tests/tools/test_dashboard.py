"""The dashboard in real Chromium (Debian's, driven by Playwright) against ``ftune up`` with a
real worker: sign in, upload by drop, read the report, start a job with defaults and watch it
live to the end, open the model, see the confusion matrix, predict on a dropped image; and a
wrong key, a spec error next to its field, cancelling. Screenshots of each page are saved in
test-artifacts/dashboard/."""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path

import httpx
import pytest

from ftune.testing.archives import zip_folder
from ftune.testing.realdata import animal_mnist_arrays, balanced_indices, write_image_folder

pytestmark = pytest.mark.processes
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"


@pytest.fixture(scope="module", autouse=True)
def _artifacts() -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)


@pytest.fixture
def page(browser, up):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(up.url + "/")
    yield page
    context.close()
    assert not errors, errors  # no script error on any page


def wait_for_js(page, expression: str, timeout_s: float = 30) -> None:
    """Poll an expression from here (the page's CSP forbids the eval that
    page.wait_for_function uses, and rightly so)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"still false after {timeout_s} s: {expression}"
        time.sleep(0.1)


def sign_in(page, key: str) -> None:
    page.fill("#key", key)
    page.click("#sign-in-form button[type=submit]")


def drop_files(page, selector: str, files: list[tuple[str, bytes, str]]) -> None:
    """A real drop event with files in its DataTransfer, as dragging from the desktop does."""
    transfer = page.evaluate_handle("""(files) => {
        const dt = new DataTransfer();
        for (const [name, b64, type] of files) {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            dt.items.add(new File([bytes], name, { type }));
        }
        return dt;
    }""", [[name, base64.b64encode(data).decode(), kind] for name, data, kind in files])
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


@pytest.fixture(scope="module")
def animal_zip(tmp_path_factory) -> bytes:
    images, labels = animal_mnist_arrays()
    idx = balanced_indices(labels, 16, classes=4)
    root = write_image_folder(tmp_path_factory.mktemp("dash") / "animals", images[idx], labels[idx])
    return zip_folder(root)


def test_a_wrong_key_is_refused_in_plain_words(page):
    sign_in(page, "ftk_not-a-real-key")
    page.wait_for_selector("#alert:not([hidden])")
    assert "not accepted" in page.inner_text("#alert")
    assert page.is_visible("#sign-in") and not page.is_visible("#nav")
    assert page.evaluate("sessionStorage.length") == 0


def test_the_whole_path_upload_train_watch_model_predict(page, up, animal_zip):
    sign_in(page, up.admin_key)
    page.wait_for_selector("#nav:not([hidden])")
    assert "ftk_" not in page.url  # the key never goes in a URL
    page.goto(up.url + "/#/datasets")
    page.wait_for_selector(".drop")
    page.screenshot(path=ARTIFACTS / "datasets.png", full_page=True)
    drop_files(page, ".drop", [("animals.zip", animal_zip, "application/zip")])
    page.wait_for_selector("#report", timeout=60_000)
    assert "Ready to train: 64 images, 4 classes" in page.inner_text("#report")
    assert page.locator("#report svg.chart rect.bar").count() == 4  # counts per class
    page.screenshot(path=ARTIFACTS / "report.png", full_page=True)

    page.goto(up.url + "/#/new-job")
    page.wait_for_selector("#spec-fields .field")
    page.screenshot(path=ARTIFACTS / "new-job.png", full_page=True)
    page.evaluate("window.__loadedOnce = true")  # gone if the page reloads
    page.click("#start-job")  # defaults: every field auto
    page.wait_for_selector("#job-status")
    seen: list[str] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status, progress = page.inner_text("#job-status"), page.inner_text("#job-progress-text")
        if not seen or seen[-1] != f"{status} | {progress}":
            seen.append(f"{status} | {progress}")
        if status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.2)
    assert page.inner_text("#job-status") == "succeeded", seen
    assert len(seen) >= 3, seen  # it changed live, more than once
    # A training stage counted its own epochs; the finished job says how many ran in all.
    assert any(re.search(r"(head|finetune), epoch \d+/\d+", line) for line in seen), seen
    assert re.fullmatch(r"\d+ epochs? run", page.inner_text("#job-progress-text")), seen
    assert page.evaluate("window.__loadedOnce") is True  # without reloading
    page.wait_for_selector("#curves svg polyline")
    assert page.locator("#events li").count() > 3
    assert "learning-rate range test" in page.inner_text("#resolved")
    assert "healthy" in page.inner_text("#diagnosis") or page.locator("#diagnosis li").count()
    page.screenshot(path=ARTIFACTS / "job.png", full_page=True)
    page.screenshot(path=ARTIFACTS / "job-top.png")  # what the README shows

    page.click("#open-model")
    wait_for_js(page, "document.querySelector('#confusion')?.naturalWidth > 0")
    assert "tf_efficientnet_lite0" in page.inner_text(".model-card")  # the default backbone
    page.screenshot(path=ARTIFACTS / "model.png", full_page=True)
    model_id = page.url.rsplit("/", 1)[-1]
    image = next(iter(sorted(_images(animal_zip))))
    drop_files(page, ".drop", [("one.png", image, "image/png")])
    page.wait_for_selector("#predict-results .prediction")
    shown = page.inner_text("#predict-results .prediction li .label >> nth=0")
    page.screenshot(path=ARTIFACTS / "model-top.png")  # what the README shows
    with httpx.Client(base_url=up.url, headers={"Authorization": f"Bearer {up.admin_key}"}) as api:
        top = api.post(f"/v1/models/{model_id}/predict", files=[("files", ("one.png", image))],
                       params={"top_k": 3}).json()["predictions"][0]
    assert shown == top[0]["label"]
    assert page.locator("#predict-results .explanation").count() == 0  # only when asked
    page.check("#explain")
    drop_files(page, ".drop", [("one.png", image, "image/png")])
    wait_for_js(page, "document.querySelector('#predict-results .explanation img')"
                "?.naturalWidth > 0")
    assert page.inner_text("#predict-results .explanation figcaption") == \
        f"Evidence for {shown}"

    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    page.goto(up.url + "/#/jobs")
    page.wait_for_selector("#jobs-body tr")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    page.screenshot(path=ARTIFACTS / "jobs-phone.png", full_page=True)


def _images(archive: bytes) -> list[bytes]:
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(archive)) as zipped:
        return [zipped.read(n) for n in zipped.namelist() if n.endswith(".png")][:1]


def test_a_spec_error_is_shown_next_to_its_field(page, up, animal_zip):
    with httpx.Client(base_url=up.url, headers={"Authorization": f"Bearer {up.admin_key}"}) as api:
        api.post("/v1/datasets", files={"file": ("animals.zip", animal_zip)})
    sign_in(page, up.admin_key)
    page.wait_for_selector("#nav:not([hidden])")
    page.goto(up.url + "/#/new-job")
    page.wait_for_selector('[data-path="epochs"] input')
    # The API refuses weights_path from any client: the form does not offer it.
    assert page.locator('[name="weights_path"], [data-path="weights_path"]').count() == 0
    page.fill('[data-path="epochs"] input', "0")
    page.click("#start-job")
    page.wait_for_selector('[data-path="epochs"] .field-error:not(:empty)')
    assert page.get_attribute('[data-path="epochs"] input', "aria-invalid") == "true"
    assert "1" in page.inner_text('[data-path="epochs"] .field-error')
    summary = page.inner_text("#job-error")
    assert "epochs" in summary and "above" in summary and "below" not in summary, summary
    # The focus is on the field to fix (not left on the button), and it is on screen.
    assert page.evaluate("document.activeElement.name") == "epochs"
    assert page.evaluate("""(() => { const r = document.activeElement.getBoundingClientRect();
        return r.top >= 0 && r.bottom <= innerHeight; })()""")
    page.fill('[data-path="optimizer.lr"] input', "-1")  # two at once: both named
    page.click("#start-job")
    wait_for_js(page, "document.querySelector('#job-error').textContent.includes('optimizer.lr')")
    assert "epochs" in page.inner_text("#job-error")
    assert page.evaluate("document.activeElement.name") == "epochs"  # the first, in form order
    page.screenshot(path=ARTIFACTS / "spec-error.png", full_page=True)


# A dataset name is the uploader's text, and the model card quotes it: it must stay text.
HOSTILE_NAME = 'animals <img src=x id=injected> [click](javascript:alert(1)) <b>no</b>'
FAST = {"preset": "fast", "image_size": 32, "epochs": 3, "batch_size": 12}
# Elements of the page that reach past the viewport's right edge outside a scroll box of their own.
OVERFLOWING = """[...document.querySelectorAll('#view *')].filter((el) =>
    el.getBoundingClientRect().right > document.documentElement.clientWidth + 1
    && !el.closest('.table-wrap, pre')).map((el) => el.tagName + ': ' + el.textContent)"""
WIDE_TABLES_SCROLL = """(() => { const wraps = [...document.querySelectorAll(SELECTOR)];
    return wraps.length > 0 && wraps.every((w) => w.getBoundingClientRect().right
        <= document.documentElement.clientWidth + 1)
      && wraps.some((w) => w.scrollWidth > w.clientWidth
        && getComputedStyle(w).overflowX === 'auto'); })()"""


def _job_to_its_end(api: httpx.Client, dataset_id: str, model_name: str) -> dict:
    """A job with the FAST spec, polled until it ends."""
    return _ended(api, api.post("/v1/jobs", json={"dataset_id": dataset_id, "spec": FAST,
                                                  "model_name": model_name}).json())


def _finished_fast_job(up, zipped: bytes) -> dict:
    """A fast-preset job on a carved val split: its head is refit on train+val."""
    with httpx.Client(base_url=up.url, headers={"Authorization": f"Bearer {up.admin_key}"},
                      timeout=60) as api:
        dataset = api.post("/v1/datasets", files={"file": ("animals.zip", zipped)},
                           data={"name": HOSTILE_NAME}, params={"dedupe": "false"}).json()
        assert dataset["name"] == HOSTILE_NAME, dataset
        job = _job_to_its_end(api, dataset["id"], "phone-check")
        model = api.get(f"/v1/models/{job['model_id']}").json() if job["model_id"] else None
    assert job["status"] == "succeeded", job["error"]
    assert job["resolved"]["refit"]["value"] is True  # what the model page must say
    return {"job": job, "model": model}


def test_on_a_phone_the_best_epoch_refit_and_rendered_card_show(page, up, animal_zip):
    run = _finished_fast_job(up, animal_zip)
    job, model = run["job"], run["model"]
    page.set_viewport_size({"width": 375, "height": 800})
    sign_in(page, up.admin_key)
    page.wait_for_selector("#nav:not([hidden])")

    page.goto(f"{up.url}/#/jobs/{job['id']}")
    page.wait_for_selector("#epochs tr.best")
    best = page.locator("#epochs tbody tr.best")
    assert best.count() == 1 and best.get_attribute("data-epoch") == str(job["best"]["epoch"])
    assert "best" in best.locator("td >> nth=0").inner_text()  # in words, not colour alone
    assert f"Epoch {job['best']['epoch']} had the best" in page.inner_text("#best-epoch")
    assert page.evaluate(OVERFLOWING) == []
    assert page.evaluate(WIDE_TABLES_SCROLL.replace("SELECTOR", "'#epochs .table-wrap'"))
    assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
    page.screenshot(path=ARTIFACTS / "job-phone.png", full_page=True)

    page.goto(f"{up.url}/#/models/{model['id']}")
    page.wait_for_selector("#model-card table")
    # Val was trained on after the refit: the page says so next to the val scores.
    assert "Refit on train+val" in page.inner_text("#refit-note")
    assert "before the refit" in page.locator("h2", has_text="Evaluation").inner_text()
    # The card is rendered: headings, tables, code; no Markdown syntax left as text.
    card = page.inner_text("#model-card")
    assert page.locator("#model-card h4", has_text="Results").count() == 1
    assert page.locator("#model-card table").count() >= 3 and "|---" not in card
    assert "## " not in card and "**" not in card.replace(HOSTILE_NAME, "")
    assert page.locator("#model-card pre code").count() == 1  # the spec, fenced
    # Nothing in the card's text becomes markup: no image, no script link, the name as typed.
    assert HOSTILE_NAME in card, [line for line in card.splitlines() if "Dataset" in line]
    assert page.locator("#injected, #model-card img, #model-card b").count() == 0
    assert page.locator("#model-card a[href^='javascript']").count() == 0
    # Its source can still be read and downloaded.
    source = page.text_content("#card-source pre")
    assert source.startswith("# Model card: phone-check v1"), source[:80]
    with page.expect_download() as download:
        page.click("#card-download")
    assert Path(download.value.path()).read_text().startswith("# Model card: phone-check v1")
    # At phone width: tables scroll in their own box, the hash breaks, the page does not widen.
    hash_code = page.locator("#model-card code", has_text=model["dataset_hash"][:16])
    assert hash_code.count() == 1
    assert page.evaluate(OVERFLOWING) == []
    assert page.evaluate(WIDE_TABLES_SCROLL.replace("SELECTOR", "'#view .table-wrap'"))
    assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
    page.screenshot(path=ARTIFACTS / "model-phone.png", full_page=True)


def test_cancelling_a_running_job(page, up, animal_zip):
    with httpx.Client(base_url=up.url, headers={"Authorization": f"Bearer {up.admin_key}"}) as api:
        dataset = api.post("/v1/datasets", files={"file": ("animals.zip", animal_zip)}).json()
        job = api.post("/v1/jobs", json={"dataset_id": dataset["id"], "spec": {
            "image_size": 64, "epochs": 50, "freeze": {"strategy": "none"}}}).json()
    sign_in(page, up.admin_key)
    page.wait_for_selector("#nav:not([hidden])")
    page.goto(f"{up.url}/#/jobs/{job['id']}")
    page.wait_for_selector("#cancel-job")
    page.on("dialog", lambda dialog: dialog.accept())
    page.click("#cancel-job")
    wait_for_js(page, "document.querySelector('#job-status')?.textContent === 'cancelled'", 60)
    assert page.is_hidden("#cancel-job")


def test_a_sweep_started_from_the_form_runs_live_and_promotes_its_best(page, up, animal_zip):
    with httpx.Client(base_url=up.url, headers={"Authorization": f"Bearer {up.admin_key}"}) as api:
        api.post("/v1/datasets", files={"file": ("animals.zip", animal_zip)}).raise_for_status()
    sign_in(page, up.admin_key)
    page.wait_for_selector("#nav:not([hidden])")
    page.goto(up.url + "/#/sweeps")
    page.wait_for_selector("#sweep-form")
    page.fill("#sweep-space", '{"optimizer.nope": {"uniform": [0, 1]}}')
    page.click("#sweep-form button[type=submit]")
    page.wait_for_selector("#sweep-errors li")
    assert "space.optimizer.nope" in page.inner_text("#sweep-errors")  # named before it runs
    page.fill("#sweep-space", '{"head.dropout": {"uniform": [0, 0.5]}}')
    page.fill("#sweep-base", '{"preset": "fast", "image_size": 32, "epochs": 2}')
    page.fill("#sweep-trials", "2")
    page.select_option("#sweep-pruner", "none")
    page.click("#sweep-form button[type=submit]")
    page.wait_for_selector("#sweep-status")
    wait_for_js(page, "document.querySelector('#sweep-status')?.textContent === 'succeeded'", 120)
    wait_for_js(page, "document.querySelectorAll('#trials-body tr').length === 2")
    # Redrawn once the sweep ended: the picture shows both finished trials.
    wait_for_js(page, "document.querySelector('#sweep-plot')?.dataset.status === 'succeeded'")
    assert page.evaluate("document.querySelector('#sweep-plot').naturalWidth") > 0
    assert page.is_hidden("#cancel-sweep")
    page.click("#promote-best")
    page.wait_for_selector("#promoted:not(:empty)")
    assert ":best now points at model" in page.inner_text("#promoted")
    page.screenshot(path=ARTIFACTS / "sweep.png", full_page=True)


@pytest.fixture(scope="module")
def mosaics_zip(tmp_path_factory) -> tuple[bytes, bytes]:
    """A small multi-label set (2×2 mosaics of real images) and one test mosaic's bytes."""
    from ftune.testing.mosaics import only, tile_pools, write_mosaics

    root = write_mosaics(tmp_path_factory.mktemp("dash") / "mosaics",
                         {"train": 60, "test": 20}, seed=4, pools=only(tile_pools(), [0, 1, 12]))
    return zip_folder(root), sorted((root / "test").glob("*.png"))[0].read_bytes()


def test_a_multi_label_model_page_shows_map_pr_curves_and_marks_labels(page, up, mosaics_zip):
    zipped, image = mosaics_zip
    with httpx.Client(base_url=up.url, headers={"Authorization": f"Bearer {up.admin_key}"},
                      timeout=60) as api:
        dataset = api.post("/v1/datasets", files={"file": ("mosaics.zip", zipped)}).json()
        assert dataset["task"] == "multi_label", dataset
        job = _job_to_its_end(api, dataset["id"], "mosaics")
        assert job["status"] == "succeeded", job["error"]
        expected = api.post(f"/v1/models/{job['model_id']}/predict",
                            files=[("files", ("m.png", image))]).json()["predictions"][0]
    sign_in(page, up.admin_key)
    page.wait_for_selector("#nav:not([hidden])")
    page.goto(f"{up.url}/#/models/{job['model_id']}")
    wait_for_js(page, "document.querySelector('#pr-curves')?.naturalWidth > 0")
    wait_for_js(page, "document.querySelector('#reliability')?.naturalWidth > 0")
    assert page.locator("#confusion").count() == 0
    assert "mAP" in page.inner_text("#accuracy") and "before calibration" in page.inner_text(
        "#accuracy")
    assert page.locator("th", has_text="AP").count() >= 1
    page.screenshot(path=ARTIFACTS / "model-multilabel.png", full_page=True)
    drop_files(page, ".drop", [("m.png", image, "image/png")])
    page.wait_for_selector("#predict-results .prediction.multi")
    marked = page.locator("#predict-results li.over .label").all_inner_texts()
    assert sorted(marked) == sorted(expected["labels"])
    assert page.locator("#predict-results li").count() == 3  # every class's score


def _ended(api: httpx.Client, job: dict) -> dict:
    """The job, polled until it ends."""
    deadline = time.monotonic() + 240
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
        job = api.get(f"/v1/jobs/{job['id']}").json()
    return job


def test_labelling_suggestions_with_the_keyboard_trains_the_next_version(page, up, animal_zip,
                                                                         tmp_path):
    from PIL import Image

    images, labels = animal_mnist_arrays()
    pool = tmp_path / "pool" / "new"
    pool.mkdir(parents=True)
    for i, index in enumerate(balanced_indices(labels, 2, offset=300, classes=4)):
        Image.fromarray(images[index]).save(pool / f"photo{i:02d}.png")  # names say nothing
    with httpx.Client(base_url=up.url, headers={"Authorization": f"Bearer {up.admin_key}"},
                      timeout=60) as api:
        dataset = api.post("/v1/datasets", files={"file": ("a.zip", animal_zip)},
                           params={"dedupe": "false"}).json()
        made = _job_to_its_end(api, dataset["id"], "labelled")
        assert made["status"] == "succeeded", made["error"]
        unlabeled = api.post("/v1/datasets", files={"file": ("p.zip", zip_folder(pool.parent))},
                             data={"kind": "unlabeled"}).json()
        suggest = _ended(api, api.post(f"/v1/models/{made['model_id']}/suggestions", json={
            "unlabeled_dataset_id": unlabeled["id"], "count": 3}).json())
        assert suggest["status"] == "succeeded", suggest["error"]
        classes = api.get(f"/v1/models/{made['model_id']}").json()["classes"]
    picks = suggest["suggestions"]
    sign_in(page, up.admin_key)
    page.wait_for_selector("#nav:not([hidden])")
    page.goto(f"{up.url}/#/jobs/{suggest['id']}")
    page.click("#open-labelling")
    wait_for_js(page, "document.querySelector('#label-image')?.naturalWidth > 0")
    assert page.inner_text("#label-progress").startswith("1 of 3")
    guessed = page.get_attribute("#label-classes [aria-pressed=true]", "data-class")
    assert guessed == picks[0]["guess"][0]["label"]  # the model's guess, chosen already
    page.click("#label-explain")
    wait_for_js(page, "document.querySelector('#label-heatmap')?.naturalWidth > 0")
    page.screenshot(path=ARTIFACTS / "labelling.png", full_page=True)
    page.keyboard.press("2")  # the second class, by its digit
    assert page.get_attribute("#label-classes [aria-pressed=true]", "data-class") == classes[1]
    page.keyboard.press("Enter")
    wait_for_js(page, "document.querySelector('#label-progress').textContent.startsWith('2 of 3')")
    page.keyboard.press("s")  # skipped
    wait_for_js(page, "document.querySelector('#label-progress').textContent.startsWith('3 of 3')")
    page.keyboard.press("Backspace")  # back to the skipped one: labelled after all
    wait_for_js(page, "document.querySelector('#label-progress').textContent.startsWith('2 of 3')")
    page.keyboard.press("Enter")  # the guess
    wait_for_js(page, "document.querySelector('#label-progress').textContent.startsWith('3 of 3')")
    page.keyboard.press("a")  # the first class whose name starts with it
    assert page.get_attribute("#label-classes [aria-pressed=true]", "data-class") == classes[0]
    page.keyboard.press("Enter")
    wait_for_js(page, "document.querySelector('#label-progress').textContent.startsWith('All 3')")
    assert "3 labelled, 0 skipped" in page.inner_text("#label-progress")
    page.click("#train-next")
    page.wait_for_url(re.compile(r".*#/jobs/\w+$"))
    job_id = page.url.rsplit("/", 1)[-1]
    with httpx.Client(base_url=up.url, headers={"Authorization": f"Bearer {up.admin_key}"},
                      timeout=60) as api:
        job = api.get(f"/v1/jobs/{job_id}").json()
        version = api.get(f"/v1/datasets/{job['dataset_id']}").json()
    assert version["parent_id"] == dataset["id"] and version["added"]["images"] == 3
    assert job["spec"] == made["spec"]
    assert version["added"]["by_class"].get(classes[1]) >= 1
