"""`kosmos serve`'s HTTP API: FastAPI routes over one `Bridge`.

    GET  /                  the page: upload a document, see its pages with boxes, text and confidence
                            (page.py; the page and its files need no key, its API calls do)
    GET  /health            200 once the model is loaded and warmed up, 503 before
    GET  /v1/info           the model, its kind, the tasks it can do, the document formats, the limits
    GET  /v1/results/{id}[/{stem}.{suffix} | /pages/{n}.png]: a finished request's records, document
                            files and pages, kept for --keep-results minutes (store.py); the pages
                            also while it runs, each once its record has gone out
    POST /v1/chat/completions, GET /v1/models: OpenAI-compatible (openai_api.py)
    POST /v1/ocr|md|ground  multipart ``file`` (+ pages, dpi, password, max_new_tokens, prompt/question):
                            application/x-ndjson, one record a page, the command's --format jsonl record

With an API key every route but /health and the page's files needs ``Authorization: Bearer KEY``.
A server bound to a loopback address answers only requests addressed to a loopback name (DNS
rebinding). Uploads are counted as they arrive, whatever Content-Length says: past the limit, 413 at
once. No traceback reaches a client: a 500 carries an id that the server's log prints with the
traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.util
import ipaddress
import logging
import re
import shutil
import threading
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .. import __version__
from ..documents import DEFAULT_DPI, DocumentError
from ..engine import Engine
from ..inputs import parse_pages
from ..tasks import TASKS, WrongModel, tasks_for
from ..writers.formats import FormatError, format_name
from . import FOLDER_PREFIX
from .bridge import Bridge, PromptTooLong, TooManyPages, Upload
from .store import ResultStore
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .openai_api import add_openai_routes
from .page import add_page_routes, is_page_path

__all__ = ["ServerConfig", "create_app", "is_loopback"]

log = logging.getLogger("kosmos.server")
NDJSON = "application/x-ndjson"
NOT_KEPT = "no such result: unknown, expired, dropped for room, or its request did not finish"
MEDIA_TYPES = {".md": "text/markdown; charset=utf-8", ".txt": "text/plain; charset=utf-8", ".json": "application/json",
               ".pdf": "application/pdf", ".hocr": "application/xhtml+xml", ".alto.xml": "application/xml"}
# The most tokens a request's own prompt (a chat question, a Kosmos-2 prompt) may add to a task's.
MAX_QUESTION_TOKENS = 256


@dataclass
class ServerConfig:
    """What a server allows: ``api_key`` (None: no key), the address it is bound to, the upload, page
    and queue limits, kept results, the one CORS origin, and the default PDF resolution (the largest
    token budget is the bridge's)."""

    host: str = "127.0.0.1"
    api_key: str | None = None
    max_upload_bytes: int = 100 * 2**20
    max_pages: int = 1000
    max_queue: int = 64  # requests waiting to be queued for the batch: past it, 429
    keep_minutes: float = 10  # finished requests kept for GET /v1/results/... (0: none)
    keep_bytes: int = 2**30  # the most the kept uploads and records take; the oldest go first
    cors_origin: str | None = None  # the one origin whose pages may call the API from a browser (None: no CORS headers)
    dpi: float = DEFAULT_DPI
    uploads: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX)))  # private


class _TooLarge(Exception):
    pass


class _CountBody:
    """Counts each request's body as it arrives (Content-Length can lie): past ``limit`` bytes, the
    read raises `_TooLarge` in whoever reads it (the upload route answers 413)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        await self.app(scope, counted, send)


class _Refused(Exception):
    """A request refused with ``status`` and a message in plain words."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name, without port) is this machine's loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(engine: Engine, bridge: Bridge, config: ServerConfig, ready: threading.Event | None = None) -> FastAPI:
    """The app for one loaded engine. ``ready`` (None: ready at once) is set once the warm-up is done."""
    tasks = tasks_for(engine.kind)
    config.uploads.mkdir(mode=0o700, parents=True, exist_ok=True)
    app = FastAPI(title="kosmos", version=__version__, docs_url="/docs",
                  description="Kosmos-2.5 and Kosmos-2 on documents and images: one warm model for many clients.")
    app.state.ready = ready
    app.add_middleware(_CountBody, limit=config.max_upload_bytes)
    if config.cors_origin is not None:
        app.add_middleware(CORSMiddleware, allow_origins=[config.cors_origin], allow_methods=["GET", "POST"],
                           allow_headers=["Authorization"], expose_headers=["X-Kosmos-Pages", "X-Kosmos-Result"])
    metrics = Metrics(bridge)
    bridge.on_page = metrics.page_done
    store = ResultStore(config.uploads / "results", config.keep_minutes, config.keep_bytes)
    app.state.store = store

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.monotonic()
        try:
            _check_host(request, config)
            if request.url.path != "/health" and not is_page_path(request.url.path):
                _check_key(request, config)
            response = await call_next(request)
        except _Refused as err:
            response = _error(err.status, str(err))
            if err.status == 401:
                response.headers["WWW-Authenticate"] = "Bearer"
        route = request.scope.get("route")
        metrics.requests.labels(route.path if route is not None else "other", str(response.status_code)).inc()
        if not getattr(request.state, "logged_by_route", False):  # a stream logs when it ends
            log.info("%s %s %s %.2fs", request.method, request.url.path, response.status_code, time.monotonic() - started)
        return response

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        incident = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s", incident, request.method, request.url.path, exc_info=err)
        return _error(500, f"internal error (id {incident}: the server's log has the details)")

    @app.get("/health")
    async def health():
        if app.state.ready is not None and not app.state.ready.is_set():
            return JSONResponse({"status": "starting"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus text: requests, pages, tokens, page latency, queues and slots")
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info")
    async def info():
        return {"model": engine.name, "kind": engine.kind, "version": __version__,
                "tasks": [task.name for task in tasks],
                "formats": {task.name: [format_name(s) for s in _documents(task)] for task in tasks},
                "keep_results_minutes": config.keep_minutes,
                "limits": {"max_upload_bytes": config.max_upload_bytes, "max_pages": config.max_pages,
                           "max_queue": config.max_queue, "max_new_tokens": bridge.max_new_tokens}}

    @app.get("/v1/results/{result}", summary="A finished request's records, again (application/x-ndjson)")
    async def result_records(result: str):
        kept = store.get(result)
        if kept is None:
            return _error(404, NOT_KEPT)
        return Response("".join(r.to_json() + "\n" for r in kept.records), media_type=NDJSON)

    @app.get("/v1/results/{result}/pages/{number}.png",
             summary="A page as rendered, once its record has gone out (its request may still be running)")
    async def result_page(result: str, number: int):
        png = None
        for _ in range(2):  # a request that finishes moves its upload into the store: then look again
            kept = store.with_pages(result)
            try:
                png = await asyncio.to_thread(kept.page_png, number) if kept is not None else None
                break
            except FileNotFoundError:
                continue
        if png is None:
            return _error(404, NOT_KEPT if kept is None else f"page {number} is not in this result (yet)")
        return Response(png, media_type="image/png")

    @app.get("/v1/results/{result}/{filename}", summary="A document file of a finished request, made from its "
             "records (the model does not run again): <stem>.md|txt|json|pdf|hocr|alto.xml")
    async def result_document(result: str, filename: str):
        kept = store.get(result)
        if kept is None:
            return _error(404, NOT_KEPT)
        suffix = next((s for s in _documents(kept.task) if filename == kept.stem + s), None)
        if suffix is None:
            names = ", ".join(kept.stem + s for s in _documents(kept.task))
            return _error(404, f"no {filename!r} here: this result has {names}")
        try:
            content = await asyncio.to_thread(kept.document, suffix)
        except FormatError as err:
            return _error(422, f"{filename}: {err.reason}")
        disposition = f"attachment; filename*=UTF-8''{quote(filename)}"
        return Response(content, media_type=MEDIA_TYPES[suffix], headers={"Content-Disposition": disposition})

    for name in ("ocr", "md", "ground"):
        _add_task_route(app, name, engine, bridge, config, store)
    add_openai_routes(app, engine, bridge, config.uploads, ready, _TooLarge, config.max_queue)
    add_page_routes(app)
    return app


def _add_task_route(app: FastAPI, name: str, engine: Engine, bridge: Bridge, config: ServerConfig,
                    store: ResultStore) -> None:
    task = TASKS[name]
    fields = {"file": {"type": "string", "format": "binary"}, "pages": {"type": "string", "example": "1-3,7"},
              "dpi": {"type": "number"}, "password": {"type": "string"}, "max_new_tokens": {"type": "integer"}}
    if name == "ground":
        fields["prompt"] = {"type": "string", "example": task.prompt}
    if name == "md":
        fields["question"] = {"type": "string", "description": "with microsoft/kosmos-2.5-chat"}
    body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"], "properties": fields}}}}}

    @app.post(f"/v1/{name}", openapi_extra=body, response_class=StreamingResponse,
              summary=f"`kosmos {name}` on one uploaded file: one JSON record a page (application/x-ndjson)")
    async def run_task(request: Request):
        if app.state.ready is not None and not app.state.ready.is_set():
            return _error(503, "the model is still warming up")
        if bridge.waiting >= config.max_queue:
            return _busy(config)
        try:
            task.check_model(engine.kind, engine.name)
            upload = await _read_upload(request, task, engine, bridge, config)
        except WrongModel as err:
            return _error(400, str(err))
        except _Refused as err:
            return _error(err.status, str(err))
        try:
            submission = await asyncio.to_thread(bridge.submit, upload, config.max_pages)
        except DocumentError as err:  # its message would name the server's private copy: say the label
            upload.path.unlink(missing_ok=True)
            return _error(422, f"{upload.name}: {err.reason}")
        except (TooManyPages, PromptTooLong) as err:
            upload.path.unlink(missing_ok=True)
            return _error(413 if isinstance(err, TooManyPages) else 400, str(err))

        started, sent, result = time.monotonic(), [], uuid.uuid4().hex
        request.state.logged_by_route = True

        store.start(result, task, upload.name, upload.path, sent, upload.password, upload.dpi)

        async def records():
            finished = False
            try:
                while (record := await asyncio.to_thread(submission.next_record)) is not None:
                    sent.append(record)  # first: a client may ask for its page as soon as it has the record
                    yield record.to_json() + "\n"
                finished = len(sent) == submission.pages
            finally:  # the client is gone (or it is all sent): nothing of this request keeps running
                submission.cancel()
                if finished:
                    await asyncio.to_thread(store.keep, result, task, upload.name, upload.path, sent, upload.password,
                                            upload.dpi)
                else:
                    store.forget(result)
                    upload.path.unlink(missing_ok=True)
                gone = "" if finished else f" (client gone after {len(sent)} of {submission.pages})"
                log.info("%s %s 200 %d pages %.2fs%s", request.method, request.url.path, len(sent),
                         time.monotonic() - started, gone)

        headers = {"X-Kosmos-Pages": str(submission.pages)}
        if store.enabled:
            headers["X-Kosmos-Result"] = result
        return StreamingResponse(records(), media_type=NDJSON, headers=headers)


async def _read_upload(request: Request, task, engine: Engine, bridge: Bridge, config: ServerConfig) -> Upload:
    """The request's form, its file stored privately while the bytes are counted."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > config.max_upload_bytes:
        raise _Refused(413, f"the upload is larger than this server takes ({config.max_upload_bytes} bytes)")
    try:
        form = await request.form(max_files=1, max_fields=16)
    except _TooLarge:
        raise _Refused(413, f"the upload is larger than this server takes ({config.max_upload_bytes} bytes)") from None
    except Exception as err:  # a body that is not multipart form data
        raise _Refused(400, f"the body must be multipart/form-data with a file field ({err})") from None
    try:
        file = form.get("file")
        if file is None or isinstance(file, str):
            raise _Refused(400, "no file: send the document as the multipart field 'file'")
        label = Path(file.filename or "upload").name or "upload"  # a label only: it names no path here
        suffix = "".join(re.findall(r"\.[A-Za-z0-9]{1,5}$", label))
        path = config.uploads / f"{uuid.uuid4().hex}{suffix}"
        with open(path, "wb") as out:
            await asyncio.to_thread(shutil.copyfileobj, file.file, out)
        try:
            return _upload(form, task, engine, bridge, config, path, label)
        except _Refused:
            path.unlink(missing_ok=True)
            raise
    finally:
        await form.close()


def _upload(form, task, engine: Engine, bridge: Bridge, config: ServerConfig, path: Path, label: str) -> Upload:
    """The request's fields, checked."""
    text = lambda key: (form.get(key) or "").strip() or None
    try:
        pages = parse_pages(text("pages")) if text("pages") else None
    except ValueError as err:
        raise _Refused(400, f"pages: {err}") from None
    dpi = _number(text("dpi"), "dpi", float, 36, 1200, config.dpi)
    limit = _number(text("max_new_tokens"), "max_new_tokens", int, 1, bridge.max_new_tokens, None)
    prompt = task.prompt
    if task.name == "ground" and text("prompt"):
        prompt = text("prompt")
    if task.name == "md" and text("question"):
        from ..processing.kosmos2_5 import chat_prompt

        prompt = chat_prompt(text("question"))
    return Upload(path, label, task, prompt, pages, dpi, form.get("password") or None, limit)


def _number(value: str | None, name: str, kind, low, high, default):
    if value is None:
        return default
    try:
        number = kind(value)
    except ValueError:
        raise _Refused(400, f"{name} must be a number, not {value!r}") from None
    if not low <= number <= high:
        raise _Refused(400, f"{name} must be from {low} to {high}, not {value}")
    return number


def _check_key(request: Request, config: ServerConfig) -> None:
    if config.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
        raise _Refused(401, "an API key is needed: Authorization: Bearer KEY")


def _check_host(request: Request, config: ServerConfig) -> None:
    """On loopback, only requests addressed to a loopback name (a page elsewhere cannot reach us
    through a name that resolves to 127.0.0.1)."""
    if not is_loopback(config.host):
        return
    host = request.headers.get("host", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if not is_loopback(name):
        raise _Refused(403, f"this server answers requests for localhost only, not for {host!r}")


def _documents(task) -> tuple[str, ...]:
    """The document files a task's results can be fetched as here (pdf only with pikepdf)."""
    return tuple(s for s in task.possible_documents if s != ".pdf" or importlib.util.find_spec("pikepdf") is not None)


def _busy(config: ServerConfig) -> JSONResponse:
    response = _error(429, f"{config.max_queue} requests are waiting already; try again shortly")
    response.headers["Retry-After"] = "2"
    return response


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)
