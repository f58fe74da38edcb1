"""The command as a client of `kosmos serve` (``--server URL``): the same inputs, resume and outputs,
with the model work done by the server.

Each document's pages still to do go up in one request (the whole file, with ``pages=`` naming them);
the records that come back go through the command's own sinks, as a local run's would. A few documents
are in flight at once (`IN_FLIGHT`), and their items come out in input order. A server that is busy
(429) is asked again after a pause (`RETRIES` times); a document it refuses or a connection that drops
gives its remaining pages failure records (the pages done are kept: a re-run with ``-o`` resumes).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import groupby

from .pages import ErrorJob, PageJob
from .results import PageResult
from .tasks import Task

__all__ = ["IN_FLIGHT", "ServerUnusable", "server_info", "remote_pages"]

IN_FLIGHT = 4  # documents uploaded at once
RETRIES = 5  # a busy server (429) is asked again after 1, 2, 4, 8 and 16 seconds


class ServerUnusable(Exception):
    """The server cannot be used at all (unreachable, the key refused): the run stops before any input."""


def _client(url: str, api_key: str | None):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(30, read=None))


def server_info(url: str, api_key: str | None) -> dict:
    """The server's /v1/info; ServerUnusable, in words, when it cannot be reached or refuses the key."""
    import httpx

    try:
        with _client(url, api_key) as http:
            answer = http.get("/v1/info")
    except httpx.HTTPError as err:
        raise ServerUnusable(f"cannot reach the server at {url}: {err}") from None
    if answer.status_code == 401:
        raise ServerUnusable(f"the server at {url} needs an API key: --api-key KEY or KOSMOS_API_KEY"
                             if api_key is None else f"the server at {url} refused the API key")
    if answer.status_code != 200:
        raise ServerUnusable(f"the server at {url} answered /v1/info with {answer.status_code}: {_reason(answer)}")
    return answer.json()


def remote_pages(task: Task, items: Iterable[PageJob | ErrorJob], *, url: str, api_key: str | None, model: str,
                 prompt: str | None, question: str | None, dpi: float, password: str | None,
                 max_new_tokens: int | None, render_images: bool, on_page: Callable[..., None] | None = None,
                 ) -> Iterator[tuple[PageJob | ErrorJob, PageResult | None]]:
    """(item, result) for every item, in input order, as `pipeline.transcribe` gives them locally.
    ``render_images``: render the pages here too (the items come from `iter_pages` with rendering),
    for overlays."""
    fields = {"dpi": str(dpi)}
    if password is not None:
        fields["password"] = password
    if max_new_tokens is not None:
        fields["max_new_tokens"] = str(max_new_tokens)
    if question is not None:
        fields["question"] = question
    elif prompt is not None and prompt != task.prompt:
        fields["prompt"] = prompt
    with _client(url, api_key) as http, ThreadPoolExecutor(IN_FLIGHT) as pool:
        waiting: deque[Future] = deque()
        for _, group in groupby(items, key=lambda item: (isinstance(item, PageJob), item.source)):
            waiting.append(pool.submit(_document, http, task, list(group), fields, model, render_images, on_page))
            while len(waiting) > IN_FLIGHT or (waiting and waiting[0].done()):
                yield from waiting.popleft().result()
        while waiting:
            yield from waiting.popleft().result()


def _document(http, task: Task, items: list, fields: dict, model: str, render_images: bool, on_page) -> list:
    """One document's items with their results (error items and skipped pages with none)."""
    pages = [item for item in items if isinstance(item, PageJob) and not item.skipped]
    if not pages:
        return [(item, None) for item in items]
    records, error = _ask(http, task, pages[0].source, [p.page for p in pages], fields)
    done = []
    for item in items:
        if not isinstance(item, PageJob) or item.skipped:
            done.append((item, None))
            continue
        record = records.get(item.page)
        if record is None:
            result = PageResult.failed(item.source, item.page, task.name, model, error or "the server sent no record")
        else:
            result = dataclasses.replace(PageResult.from_dict(record), source=item.source)
            if render_images:  # overlays are drawn here, on the page rendered here as the server did
                item.load()
            if on_page is not None:
                on_page(result, result.new_tokens or 0)
        done.append((item, result))
    return done


def _ask(http, task: Task, path, pages: list[int], fields: dict) -> tuple[dict[int, dict], str | None]:
    """The server's records for the pages of one file, by page number, and what went wrong if not all came."""
    import httpx

    records: dict[int, dict] = {}
    attempt = 0
    while True:
        try:
            with open(path, "rb") as f, http.stream("POST", f"/v1/{task.name}", files={"file": (path.name, f)},
                                                    data={**fields, "pages": ",".join(map(str, pages))}) as answer:
                if answer.status_code == 429 and attempt < RETRIES:
                    time.sleep(2 ** attempt)
                    attempt += 1
                    continue
                if answer.status_code == 429:
                    return records, f"the server stayed busy (429, asked {RETRIES + 1} times)"
                if answer.status_code != 200:
                    answer.read()
                    return records, f"the server answered {answer.status_code}: {_reason(answer)}"
                for line in answer.iter_lines():
                    if line.strip():
                        record = json.loads(line)
                        records[record["page"]] = record
            return records, None
        except httpx.HTTPError as err:
            return records, f"the connection to the server was lost ({err})"
        except OSError as err:
            return records, f"cannot read the file: {err}"


def _reason(answer) -> str:
    try:
        error = answer.json().get("error")
    except ValueError:
        return answer.text[:200]
    return error.get("message", str(error)) if isinstance(error, dict) else str(error)
