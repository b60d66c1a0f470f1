"""``/`` and ``/ui/*``: the dashboard's files, from a fixed list (nothing else is served).

No data is in these files, so they need no key; the key is pasted into the page, kept in the
tab's sessionStorage and sent as a header by the page's own requests, never in a URL."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Response

from ftune.service.errors import NotFound

router = APIRouter(include_in_schema=False)

ASSETS = {  # name -> media type
    "app.js": "text/javascript", "api.js": "text/javascript", "charts.js": "text/javascript",
    "forms.js": "text/javascript", "views.js": "text/javascript", "sweeps.js": "text/javascript",
    "markdown.js": "text/javascript", "labelling.js": "text/javascript", "app.css": "text/css",
}
# The pages load only their own scripts and styles, and talk only to this origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                               "style-src 'self'; script-src 'self'; connect-src 'self'; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


@router.get("/")
def index() -> Response:
    return Response(_read("index.html"), media_type="text/html", headers=SECURITY_HEADERS)


@router.get("/ui/{name}")
def asset(name: str) -> Response:
    media = ASSETS.get(name)
    if media is None:
        raise NotFound(f"no dashboard file {name!r}")
    return Response(_read(name), media_type=media, headers=SECURITY_HEADERS)
