"""Pages in, page results out: batching page jobs through an engine and parsing with the task.

    documents.iter_pages -> documents.prefetch -> transcribe(engine, task, ...) -> (job, PageResult)

Items come out in the order they went in (stdout output stays in document order); error items
pass straight through with no result."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from .documents import ErrorJob, PageJob
from .engine import Engine, Job, Output
from .tasks import grounding, markdown, ocr
from .models import kosmos2, kosmos2_5
from .models.generation import LoopCheck
from .tasks.repetition import WINDOW, find_loop, may_loop
from .writers import PageResult


@dataclass(frozen=True)
class Task:
    name: str  # the JSONL "task" field and the command name
    model_kind: str  # the engine kind it needs
    default_model: str
    prompt: str
    max_new_tokens: int
    page_fields: Callable[[str, tuple[int, int], tuple[int, int]], dict]
    caption_task: bool = False  # the prompt is the start of the caption (Kosmos-2 grounding)


# Default token budgets: a dense Kosmos-2.5 page runs past 2,000 tokens (OCR spends 6 box tokens per
# line), so 3,072 fits full pages; the loop guard ends degenerate pages long before that.
# Grounded captions are short; 128 is the Kosmos-2 demo's budget.
TASKS = {
    "ocr": Task("ocr", kosmos2_5.ARCHITECTURE.name, "microsoft/kosmos-2.5", ocr.PROMPT, 3072, ocr.page_fields),
    "md": Task("md", kosmos2_5.ARCHITECTURE.name, "microsoft/kosmos-2.5", markdown.PROMPT, 3072, markdown.page_fields),
    "ground": Task("ground", kosmos2.ARCHITECTURE.name, "microsoft/kosmos-2-patch14-224", grounding.PROMPT, 128,
                   grounding.page_fields, caption_task=True),
}


def _keep_before_loop(ids: list[int]) -> int | None:
    """How many ids to keep when the generation has fallen into an exact loop, else None."""
    loop = find_loop(ids)
    return None if loop is None else loop.keep


LOOP_GUARD = LoopCheck(_keep_before_loop, WINDOW, may_loop)


OUT_OF_MEMORY = "out of GPU memory on a single page: lower --max-new-tokens or --dpi, or use --device cpu"


def transcribe(
    engine: Engine,
    task: Task,
    items: Iterable[PageJob | ErrorJob],
    *,
    prompt: str | None = None,
    batch_size: int = 1,
    max_new_tokens: int | None = None,
    on_page: Callable[[PageResult, int], None] | None = None,
    lookahead: int = 4,
) -> Iterator[tuple[PageJob | ErrorJob, PageResult | None]]:
    """Run the task on every rendered page with continuous batching (`batch_size` slots); yield
    (item, result) in input order. Error items and skipped pages come out with result None.

    Images are preprocessed up to `lookahead` pages ahead in background threads. On out-of-memory
    the engine backs off (see Engine.stream_backing_off): nothing is lost, and a page that runs out
    of memory alone gets an error result. Every item that goes in comes out: the end checks it.
    `on_page(result, new_tokens)` is called as each page finishes (progress reporting)."""
    prompt = task.prompt if prompt is None else prompt
    limit = task.max_new_tokens if max_new_tokens is None else max_new_tokens
    order: deque[PageJob | ErrorJob] = deque()  # items pulled, waiting for their turn
    results: dict[int, PageResult] = {}
    source = _prepared(engine, items, lookahead, order)
    pages: dict[int, PageJob] = {}  # pages taken from the source and not finished

    def ready() -> Iterator[tuple[PageJob | ErrorJob, PageResult | None]]:
        while order and (not _needs_model(order[0]) or id(order[0]) in results):
            item = order.popleft()
            yield item, results.pop(id(item), None)

    def jobs() -> Iterator[Job]:
        for page, prepared in source:
            pages[id(page)] = page
            yield Job(id(page), prepared, prompt, limit)

    for key, out in engine.stream_backing_off(jobs(), slots=batch_size, max_prompt_tokens=engine.prompt_length(prompt),
                                              max_new_tokens=limit, loop_check=LOOP_GUARD):
        page = pages.pop(key)
        if out is None:
            results[key] = PageResult.failed(page.source, page.page, task.name, engine.name, OUT_OF_MEMORY)
        else:
            results[key] = _result(engine, task, page, out, prompt)
            if on_page is not None:
                on_page(results[key], len(out.ids))
        yield from ready()
    yield from ready()
    if order:  # every item pulled is in `order` until it is yielded: a leftover would be a lost page
        raise RuntimeError(f"internal error: {order[0]} and {len(order) - 1} more items never came out")


def _needs_model(item: PageJob | ErrorJob) -> bool:
    return isinstance(item, PageJob) and not item.skipped


def _prepared(engine: Engine, items: Iterable[PageJob | ErrorJob], lookahead: int, order: deque):
    """Yield (page, engine.prepare(page.image)) for the pages that need the model, preprocessing up
    to `lookahead` pages ahead in threads; every item pulled is appended to `order`."""
    pending: deque[tuple[PageJob, Future]] = deque()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="kosmos-prepare") as pool:
        for item in items:
            order.append(item)
            if _needs_model(item):
                pending.append((item, pool.submit(engine.prepare, item.image)))
            while len(pending) > lookahead or (pending and pending[0][1].done()):
                page, future = pending.popleft()
                yield page, future.result()
        while pending:
            page, future = pending.popleft()
            yield page, future.result()


def _result(engine: Engine, task: Task, page: PageJob, out: Output, prompt: str) -> PageResult:
    raw = prompt + out.text if task.caption_task else out.text
    page_size = page.size or page.image.size  # the full page: the image may be a smaller working copy
    return PageResult(
        source=page.source, page=page.page, task=task.name, model=engine.name,
        width=page_size[0], height=page_size[1], raw=raw, truncated=out.truncated,
        **task.page_fields(raw, out.model_size, page_size),
    )
