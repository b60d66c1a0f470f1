"""``/docs``: Swagger UI for ``/openapi.json``, and ``/favicon.ico``, served by the API itself.

FastAPI's own /docs loads Swagger UI from a CDN and starts it with an inline script: a blank
page offline, and one the dashboard's CSP would block. Here the page, its starter script and
Swagger UI's files (from the swagger-ui-bundle package) come from this origin, from a fixed
list of files, under the dashboard's security headers."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

from fastapi import APIRouter, Response
from swagger_ui_bundle import swagger_ui_path

from ftune.service.dashboard.routes import SECURITY_HEADERS
from ftune.service.errors import NotFound

router = APIRouter(include_in_schema=False)

OWN_FILES = resources.files(__package__).joinpath("api_docs_files")
# name under /docs/ -> (folder, media type)
ASSETS = {
    "swagger-ui-bundle.js": (swagger_ui_path, "text/javascript"),
    "swagger-ui.css": (swagger_ui_path, "text/css"),
    "docs.js": (OWN_FILES, "text/javascript"),
}


def _read(folder: Traversable, name: str) -> bytes:
    return folder.joinpath(name).read_bytes()


@router.get("/docs")
def docs_page() -> Response:
    return Response(_read(OWN_FILES, "docs.html"), media_type="text/html",
                    headers=SECURITY_HEADERS)


@router.get("/docs/{name}")
def docs_asset(name: str) -> Response:
    if name not in ASSETS:
        raise NotFound(f"no API docs file {name!r}; the page is /docs")
    folder, media = ASSETS[name]
    return Response(_read(folder, name), media_type=media, headers=SECURITY_HEADERS)


@router.get("/favicon.ico")
def favicon() -> Response:
    return Response(_read(OWN_FILES, "favicon.ico"), media_type="image/vnd.microsoft.icon",
                    headers=SECURITY_HEADERS)
