"""The OpenAI-compatible part of `kosmos serve`: ``POST /v1/chat/completions`` and ``GET /v1/models``.

A request is one user message with one ``image_url`` part (a ``data:`` URL: the server never fetches
or opens what a request names) and one text part, which says the task: ``<ocr>``, ``<md>``, a
question for microsoft/kosmos-2.5-chat (any other text, with a Kosmos-2.5 model), or a Kosmos-2
prompt (``<grounding> An image of``). The answer's content is the page record's ``raw`` (for grounding
it starts with the prompt, as in the record); ``finish_reason`` is ``stop`` for a page that ended on
EOS and ``length`` otherwise (a loop cut short too); ``usage`` counts the prompt with its image tokens
and the record's ``new_tokens``. ``stream: true`` sends server-sent events in OpenAI's chunk format: a
role chunk, the content in one chunk once the page is done, a finish chunk, a usage chunk when
``stream_options.include_usage`` asks for it, then ``data: [DONE]``. Sampling is greedy only: a
temperature or top_p that is not greedy, ``n`` > 1 or tools are a 400; an unknown model a 404.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..documents import DocumentError
from ..engine import Engine
from ..tasks import TASKS
from .bridge import Bridge, PromptTooLong, Submission, Upload

__all__ = ["add_openai_routes"]

_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?:;[\w=.+-]+)*?;base64,(?P<data>.*)", re.DOTALL)
_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp", "image/gif": ".gif",
           "image/bmp": ".bmp", "image/tiff": ".tiff", "application/pdf": ".pdf"}


class _Invalid(Exception):
    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def add_openai_routes(app: FastAPI, engine: Engine, bridge: Bridge, uploads: Path, ready, too_large,
                      max_queue: int) -> None:
    """The two routes, on ``app``; ``uploads`` is the server's private folder, ``ready`` its warm-up
    event, ``too_large`` the exception its body counter raises, ``max_queue`` the requests that may
    wait to be queued for the batch (429 past it)."""

    @app.get("/v1/models", summary="The model this server runs (OpenAI's format)")
    async def models():
        return {"object": "list", "data": [_model_card(engine)]}

    @app.post("/v1/chat/completions", summary="OpenAI-compatible: one image and one task, prompt or question")
    async def chat_completions(request: Request):
        if ready is not None and not ready.is_set():
            return _openai_error(_Invalid("the model is still warming up", 503))
        if bridge.waiting >= max_queue:
            busy = _openai_error(_Invalid(f"{max_queue} requests are waiting already; try again shortly", 429))
            busy.headers["Retry-After"] = "2"
            return busy
        try:
            try:
                body = await request.json()
            except too_large:
                raise _Invalid("the request body is larger than this server takes", 413) from None
            except ValueError:
                raise _Invalid("the body must be a JSON object") from None
            upload, stream, include_usage = _read(body, engine, bridge, uploads)
        except _Invalid as err:
            return _openai_error(err)
        try:
            submission = await asyncio.to_thread(bridge.submit, upload)
        except DocumentError as err:
            upload.path.unlink(missing_ok=True)
            return _openai_error(_Invalid(f"the image cannot be read: {err.reason}", 422))
        except PromptTooLong as err:
            upload.path.unlink(missing_ok=True)
            return _openai_error(_Invalid(str(err), param="messages"))
        answer = _Answer(engine, upload.prompt)
        if stream:
            return StreamingResponse(_events(request, submission, upload, answer, include_usage),
                                     media_type="text/event-stream")
        try:
            record = await _one_record(request, submission)
        finally:
            submission.cancel()
            upload.path.unlink(missing_ok=True)
        if record is None:  # the client left: nobody reads this
            return JSONResponse({}, status_code=499)
        if record.error is not None:
            return _openai_error(_Invalid(f"the page failed: {record.error}", 500))
        return answer.completion(record)


class _Answer:
    """What one request's record becomes in OpenAI's formats."""

    def __init__(self, engine: Engine, prompt: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = engine.name
        self.prompt_tokens = engine.prompt_length(prompt)

    def usage(self, record) -> dict:
        completion = record.new_tokens or 0
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def completion(self, record) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": record.raw},
                             "finish_reason": _finish(record), "logprobs": None}],
                "usage": self.usage(record)}

    def chunk(self, delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        choices = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _events(request: Request, submission: Submission, upload: Upload, answer: _Answer, include_usage: bool):
    try:
        yield answer.chunk({"role": "assistant", "content": ""})
        record = await asyncio.to_thread(submission.next_record)
        if record is None:
            return
        if record.error is not None:
            error = {"error": {"message": record.error, "type": "server_error", "param": None, "code": None}}
            yield f"data: {json.dumps(error)}\n\n"
            return
        yield answer.chunk({"content": record.raw})
        yield answer.chunk({}, _finish(record))
        if include_usage:
            yield answer.chunk({}, usage=answer.usage(record))
        yield "data: [DONE]\n\n"
    finally:
        submission.cancel()
        upload.path.unlink(missing_ok=True)


async def _one_record(request: Request, submission: Submission):
    """The submission's one record; None (its page cancelled) if the client goes away first."""
    waiting = asyncio.ensure_future(asyncio.to_thread(submission.next_record))
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=0.5)
        if done:
            return waiting.result()
        if await request.is_disconnected():
            submission.cancel()
            await waiting
            return None


def _finish(record) -> str:
    return "length" if record.truncated else "stop"


def _model_card(engine: Engine) -> dict:
    return {"id": engine.name, "object": "model", "created": 0, "owned_by": "kosmos"}


def _read(body, engine: Engine, bridge: Bridge, uploads: Path) -> tuple[Upload, bool, bool]:
    """The request checked: (the upload, stream?, include usage?)."""
    if not isinstance(body, dict):
        raise _Invalid("the body must be a JSON object")
    if body.get("model") not in (None, engine.name):
        raise _Invalid(f"The model `{body.get('model')}` does not exist or you do not have access to it.", 404,
                       "model_not_found", "model")
    if body.get("n", 1) != 1:
        raise _Invalid("n must be 1: decoding is greedy, every choice would be the same", param="n")
    if body.get("tools") or body.get("functions"):
        raise _Invalid("tools are not supported", param="tools")
    if body.get("temperature") not in (None, 0, 0.0):
        raise _Invalid("temperature must be 0 (or left out): decoding is greedy", param="temperature")
    if body.get("top_p") not in (None, 1, 1.0):
        raise _Invalid("top_p must be 1 (or left out): decoding is greedy", param="top_p")
    messages = body.get("messages")
    if not (isinstance(messages, list) and len(messages) == 1 and isinstance(messages[0], dict)
            and messages[0].get("role") == "user"):
        raise _Invalid("send one user message, with an image_url part and a text part", param="messages")
    content = messages[0].get("content")
    parts = content if isinstance(content, list) else []
    texts = [p.get("text") for p in parts if isinstance(p, dict) and p.get("type") == "text"]
    images = [p.get("image_url") for p in parts if isinstance(p, dict) and p.get("type") == "image_url"]
    if len(texts) != 1 or len(images) != 1 or not isinstance(texts[0], str):
        raise _Invalid("the user message needs exactly one image_url part and one text part", param="messages")
    url = images[0].get("url") if isinstance(images[0], dict) else images[0]
    if not isinstance(url, str) or not url.startswith("data:"):
        raise _Invalid("image_url must be a data: URL (base64); this server fetches and opens nothing a request "
                       "names", param="messages")
    task, prompt = _task(texts[0].strip(), engine)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= bridge.max_new_tokens):
        raise _Invalid(f"max_tokens must be from 1 to {bridge.max_new_tokens}", param="max_tokens")
    path = _store(url, uploads)
    options = body.get("stream_options") or {}
    return (Upload(path, "image", task, prompt, max_new_tokens=limit), bool(body.get("stream")),
            bool(isinstance(options, dict) and options.get("include_usage")))


def _task(text: str, engine: Engine):
    """The task and prompt a text part asks for."""
    if engine.kind == "kosmos-2":
        return TASKS["ground"], text or TASKS["ground"].prompt
    if text in ("<ocr>", "<md>"):
        return (TASKS["ocr"] if text == "<ocr>" else TASKS["md"]), text
    if not text:
        raise _Invalid("the text part says the task: <ocr>, <md> or a question", param="messages")
    from ..processing.kosmos2_5 import chat_prompt

    return TASKS["md"], chat_prompt(text)


def _store(url: str, uploads: Path) -> Path:
    """The data URL's bytes in the server's private folder."""
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise _Invalid("image_url is not a base64 data: URL", param="messages")
    try:
        data = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise _Invalid("image_url's base64 cannot be decoded", param="messages") from None
    path = uploads / f"{uuid.uuid4().hex}{_SUFFIX.get((match['type'] or '').lower(), '.png')}"
    path.write_bytes(data)
    return path


def _openai_error(err: _Invalid) -> JSONResponse:
    kind = "invalid_request_error" if err.status < 500 else "server_error"
    return JSONResponse({"error": {"message": str(err), "type": kind, "param": err.param, "code": err.code}},
                        status_code=err.status)
