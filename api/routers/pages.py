"""The pages: the search page (`/`) and the curation browser (`/curation`), static files of the api package
(api/static: plain HTML, CSS and ES modules; no build step, no CDN) that call the JSON routes.

Every page answer carries a Content-Security-Policy without inline script (`script-src 'self'`); static files
are served from a fixed list with their media types, nothing else from the package is reachable.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from api.dependencies import SettingsDep
from api.settings import ApiSettings

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".html": "text/html; charset=utf-8",
}
# What /static/{name} serves: the page assets, by name (the HTML pages are served at / and /curation).
STATIC_FILES = frozenset({"common.js", "search.js", "curation.js", "style.css", "favicon.svg"})

router = APIRouter(include_in_schema=False)


def content_security_policy(settings: ApiSettings) -> str:
    """Scripts and styles only from this origin (no inline script, no inline event handlers, no eval); images also
    from the public image base URL when one is configured, and blob: for the preview of an uploaded image."""
    img = ["'self'", "blob:"]
    if settings.public_url:
        parts = urlsplit(settings.public_url)
        if parts.scheme in ("http", "https") and parts.netloc:
            img.append(f"{parts.scheme}://{parts.netloc}")
    return "; ".join([
        "default-src 'none'", "script-src 'self'", "style-src 'self'", f"img-src {' '.join(img)}",
        "connect-src 'self'", "font-src 'self'", "manifest-src 'self'", "base-uri 'none'", "form-action 'self'",
        "frame-ancestors 'none'",
    ])


def _page_headers(settings: ApiSettings) -> dict[str, str]:
    return {
        "Content-Security-Policy": content_security_policy(settings),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-cache",
    }


def _page(name: str, settings: ApiSettings) -> FileResponse:
    return FileResponse(STATIC_DIR / name, media_type=STATIC_TYPES[".html"], headers=_page_headers(settings))


@router.api_route("/", methods=["GET", "HEAD"])
def search_page(settings: SettingsDep):
    """The search page."""
    return _page("index.html", settings)


@router.api_route("/curation", methods=["GET", "HEAD"])
def curation_page(settings: SettingsDep):
    """The curation browser."""
    return _page("curation.html", settings)


@router.get("/static/{name}")
def static_file(name: str, settings: SettingsDep):
    if name not in STATIC_FILES:
        raise HTTPException(404, "not found")
    path = STATIC_DIR / name
    return FileResponse(path, media_type=STATIC_TYPES[path.suffix], headers=_page_headers(settings))
