"""The web console (issue 13): static HTML, CSS and small ES modules from `gateway/console/`, served at /console.

The console is only a client of the public /v1 API: it keeps the caller's API key in the browser's sessionStorage
and sends it as a Bearer token, so it can do nothing a key holder could not do with curl. No build step, no CDN:
the files below are what the browser runs. They are served with a strict Content-Security-Policy (scripts and
styles from this origin only); videos play from the presigned output URLs, which live on the object store's
origin, hence `media-src` allows any http(s) origin.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

CONSOLE_DIR = Path(__file__).with_name("console")

# Flat file names only: no "/", no "..", no hidden files, so a path can never leave CONSOLE_DIR.
_ASSET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\.(html|js|css|svg)")
_MEDIA_TYPES = {
    "html": "text/html; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "media-src 'self' http: https: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # Presigned URLs and ids must not leak to other origins through the Referer header.
    "Referrer-Policy": "no-referrer",
    # Small files that change with each release: always revalidate (ETag/Last-Modified make that cheap).
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def asset_path(name: str) -> Path | None:
    """The file under CONSOLE_DIR that `name` denotes ("" is the page itself), or None when there is none."""
    name = name or "index.html"
    match = _ASSET_NAME.fullmatch(name)
    if match is None:
        return None
    path = CONSOLE_DIR / name
    return path if path.is_file() else None


@router.get("/console")
async def console_root() -> RedirectResponse:
    """The console lives under /console/ so its relative module URLs resolve inside it."""
    return RedirectResponse("console/", status_code=308)


@router.get("/console/{name:path}")
async def console_asset(name: str) -> FileResponse:
    """index.html for /console/ (the console routes with the URL fragment: #/new, #/videos/<id>, #/history,
    #/usage), else one of its static files."""
    path = asset_path(name)
    if path is None:
        raise HTTPException(status_code=404, detail=f"no console file {name!r}")
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix[1:]], headers=SECURITY_HEADERS)
