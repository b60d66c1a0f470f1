"""``/docs`` in real Chromium (Debian's, driven by Playwright) against ``ftune up``, with every
request to another origin refused as on a machine with no network: Swagger UI renders the
API's operations, with no script error and no CSP refusal. A screenshot is saved in
test-artifacts/api-docs/."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.processes
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "api-docs"


@pytest.fixture(scope="module", autouse=True)
def _artifacts() -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)


def test_the_docs_page_renders_the_operations_offline(browser, up):
    origin = urlsplit(up.url).netloc
    elsewhere: list[str] = []
    problems: list[str] = []

    def offline(route) -> None:  # anything from another origin (a CDN, a validator) is noted
        if urlsplit(route.request.url).netloc == origin:
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.route("**/*", offline)
    page = context.new_page()
    page.on("pageerror", lambda exc: problems.append(f"script error: {exc}"))
    # CSP refusals and failed loads are reported as console errors.
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    try:
        page.goto(up.url + "/docs")
        jobs_path = page.locator(".opblock-summary-path[data-path='/v1/jobs']")
        jobs_path.first.wait_for(timeout=30_000)  # OpenAPI 3.1, rendered
        assert page.locator(".opblock").count() > 20  # every operation, not just one
        assert page.is_visible("button.authorize")  # keys are pasted here
        list_jobs = page.locator(".opblock-get", has=jobs_path)
        list_jobs.locator(".opblock-summary-control").click()  # its parameters and responses
        list_jobs.locator("button.try-out__btn").wait_for()
        page.screenshot(path=ARTIFACTS / "docs.png")
    finally:
        context.close()
    assert elsewhere == []
    assert problems == []
