"""``/docs`` works offline: the page loads Swagger UI only from this origin (no CDN), under the
dashboard's CSP, and every file it names is served with its media type; ``/favicon.ico`` too.
(tests/tools/test_api_docs_browser.py renders the page in Chromium.)"""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from ftune.service.app import create_app
from ftune.service.dashboard.routes import SECURITY_HEADERS
from ftune.service.settings import Settings

MEDIA = {".js": "text/javascript", ".css": "text/css", ".ico": "image/vnd.microsoft.icon"}


class _Resources(HTMLParser):
    """The URLs of a page's scripts, styles and icons, and whether it has inline code."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "style" or "style" in found or any(a.startswith("on") for a in found):
            self.inline.append(tag)
        if tag == "script" and not found.get("src"):
            self.inline.append(tag)
        elif tag in ("script", "link"):
            self.urls.append(found.get("src") or found.get("href") or "")


@pytest.fixture(scope="module")
def http(tmp_path_factory) -> TestClient:
    home = tmp_path_factory.mktemp("docs") / "home"
    return TestClient(create_app(Settings(home=home, redis_url="redis://127.0.0.1:1/0")),
                      base_url="http://127.0.0.1")


def _assert_secured(response, media: str) -> None:
    assert response.status_code == 200, response.text[:200]
    assert response.headers["content-type"].split(";")[0] == media
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value, name


def test_the_docs_page_loads_only_same_origin_files_each_served(http):
    page = http.get("/docs")
    _assert_secured(page, "text/html")
    resources = _Resources()
    resources.feed(page.text)
    assert resources.inline == []  # the CSP would refuse inline script or style
    assert {"/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css", "/docs/docs.js",
            "/favicon.ico"} == set(resources.urls)
    for url in resources.urls:
        assert url.startswith("/") and not url.startswith("//"), url  # this origin only
        suffix = url[url.rindex("."):]
        _assert_secured(http.get(url), MEDIA[suffix])
    assert http.get("/docs/swagger-ui-bundle.js").text.count("SwaggerUIBundle") > 0


def test_the_page_starts_swagger_ui_on_the_openapi_document(http):
    starter = http.get("/docs/docs.js").text
    assert 'url: "/openapi.json"' in starter and "validatorUrl: null" in starter
    document = http.get("/openapi.json")
    assert document.status_code == 200
    assert "/v1/jobs" in document.json()["paths"]
    assert "/docs" not in document.json()["paths"]  # the page is not an API operation


def test_only_the_listed_files_are_served(http):
    for name in ("swagger-ui.js.map", "index.html", "docs.html", "favicon.ico"):
        response = http.get(f"/docs/{name}")
        assert response.status_code == 404, name
        assert "/docs" in response.text  # says where the page is
    assert http.get("/docs/..%2Fapi_docs.py").status_code == 404
    assert http.get("/redoc").status_code == 404  # FastAPI's CDN pages are off


def test_the_favicon_is_an_icon(http):
    icon = http.get("/favicon.ico")
    _assert_secured(icon, "image/vnd.microsoft.icon")
    assert icon.content.startswith(b"\x00\x00\x01\x00")  # the ICO header
