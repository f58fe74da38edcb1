"""Pages in, page results out: batching page jobs through an engine and parsing with the task.

    documents.iter_pages -> documents.prefetch -> transcribe(engine, task, ...) -> (job, PageResult)

Items come out in the order they went in (stdout output stays in document order); error items
pass straight through with no result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from .documents import ErrorJob, PageJob
from .engine import Engine, Output
from .tasks import grounding, markdown, ocr
from .tasks.repetition import find_loop
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
    "ocr": Task("ocr", "kosmos-2.5", "microsoft/kosmos-2.5", ocr.PROMPT, 3072, ocr.page_fields),
    "md": Task("md", "kosmos-2.5", "microsoft/kosmos-2.5", markdown.PROMPT, 3072, markdown.page_fields),
    "ground": Task("ground", "kosmos-2", "microsoft/kosmos-2-patch14-224", grounding.PROMPT, 128,
                   grounding.page_fields, caption_task=True),
}


def loop_guard(ids: list[int]) -> int | None:
    """How many ids to keep when the generation has fallen into an exact loop, else None."""
    loop = find_loop(ids)
    return None if loop is None else loop.keep


class OutOfMemory(RuntimeError):
    """A single page did not fit in GPU memory."""


def transcribe(
    engine: Engine,
    task: Task,
    items: Iterable[PageJob | ErrorJob],
    *,
    prompt: str | None = None,
    batch_size: int = 1,
    max_new_tokens: int | None = None,
    on_batch: Callable[[list[PageResult], int], None] | None = None,
) -> Iterator[tuple[PageJob | ErrorJob, PageResult | None]]:
    """Run the task on every rendered page; yield (item, result) in input order.

    Error items and skipped pages come out with result None. `on_batch(results, new_tokens)` is
    called after each batch (progress reporting)."""
    prompt = task.prompt if prompt is None else prompt
    limit = task.max_new_tokens if max_new_tokens is None else max_new_tokens
    pending: list[PageJob | ErrorJob] = []

    def flush() -> Iterator[tuple[PageJob | ErrorJob, PageResult | None]]:
        pages = [item for item in pending if isinstance(item, PageJob) and not item.skipped]
        batch, new_tokens = _run(engine, task, pages, prompt, limit)
        results = {id(job): res for job, res in zip(pages, batch)}
        if on_batch is not None and pages:
            on_batch(batch, new_tokens)
        for item in pending:
            yield item, results.get(id(item))
        pending.clear()

    for item in items:
        pending.append(item)
        if sum(isinstance(i, PageJob) and not i.skipped for i in pending) >= batch_size:
            yield from flush()
    yield from flush()


def _run(engine: Engine, task: Task, pages: list[PageJob], prompt: str, limit: int) -> tuple[list[PageResult], int]:
    """Results for the pages and the number of new tokens generated."""
    if not pages:
        return [], 0
    try:
        outputs = _generate(engine, [p.image for p in pages], prompt, limit)
    except OutOfMemory as err:
        return [PageResult.failed(p.source, p.page, task.name, engine.name, str(err)) for p in pages], 0
    results = [_result(engine, task, page, out, prompt) for page, out in zip(pages, outputs)]
    return results, sum(len(out.ids) for out in outputs)


def _generate(engine: Engine, images: list, prompt: str, limit: int) -> list[Output]:
    """engine.run, halving the batch on CUDA out-of-memory so no page is lost."""
    try:
        return engine.run(images, prompt, limit, loop_check=loop_guard)
    except torch.OutOfMemoryError:
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(images) == 1:
            raise OutOfMemory(
                "out of GPU memory on a single page: lower --max-new-tokens or --dpi, or use --device cpu"
            ) from None
        half = len(images) // 2
        return _generate(engine, images[:half], prompt, limit) + _generate(engine, images[half:], prompt, limit)


def _result(engine: Engine, task: Task, page: PageJob, out: Output, prompt: str) -> PageResult:
    raw = prompt + out.text if task.caption_task else out.text
    page_size = page.image.size
    return PageResult(
        source=str(page.source), page=page.page, task=task.name, model=engine.name,
        width=page_size[0], height=page_size[1], raw=raw, truncated=out.truncated,
        **task.page_fields(raw, out.model_size, page_size),
    )
