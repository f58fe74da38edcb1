"""The page at ``/``: one small HTML page with its script, markdown renderer, style sheet and icon
(``static/``), served without the API key (the page asks for the key and sends it with its API
calls). Every answer carries a Content-Security-Policy of ``default-src 'self'``: the page runs only
its own files, loads nothing from any other host and can send nothing to one, whatever a document's
text says. Images may also come from ``blob:`` URLs, which the page makes from the page PNGs it
fetched from this server (with a key, an ``<img src>`` could not send the Authorization header);
a blob: URL is this page's own memory, not another host.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

__all__ = ["PAGE_PATHS", "POLICY", "add_page_routes", "is_page_path"]

STATIC = Path(__file__).with_name("static")
POLICY = ("default-src 'self'; img-src 'self' blob:; base-uri 'none'; form-action 'none'; "
          "frame-ancestors 'none'")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
_FILES = ("page.js", "markdown.js", "page.css", "icon.svg")
PAGE_PATHS = frozenset({"/", *(f"/static/{name}" for name in _FILES)})


def is_page_path(path: str) -> bool:
    """Whether ``path`` is the page or one of its files (served without the API key)."""
    return path in PAGE_PATHS


@dataclass(frozen=True)
class _File:
    content: bytes
    media_type: str
    etag: str


def _read(name: str) -> _File:
    content = (STATIC / name).read_bytes()
    return _File(content, _TYPES[Path(name).suffix], '"' + hashlib.sha256(content).hexdigest()[:20] + '"')


def add_page_routes(app: FastAPI) -> None:
    """``GET /`` and ``GET /static/<file>``, read once here; ``no-cache`` with an ETag, so a browser
    asks each time (a 304 when nothing changed) and never keeps an old page after an upgrade."""
    files = {"/": _read("index.html"), **{f"/static/{name}": _read(name) for name in _FILES}}

    def answer(request: Request, file: _File) -> Response:
        headers = {"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff",
                   "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache", "ETag": file.etag}
        if file.etag in {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}:
            return Response(status_code=304, headers=headers)
        return Response(file.content, media_type=file.media_type, headers=headers)

    @app.get("/", include_in_schema=False)
    async def page(request: Request):
        return answer(request, files["/"])

    @app.get("/static/{name}", include_in_schema=False)
    async def static(request: Request, name: str):
        file = files.get(f"/static/{name}")
        if file is None:
            return JSONResponse({"error": "no such file"}, status_code=404)
        return answer(request, file)
