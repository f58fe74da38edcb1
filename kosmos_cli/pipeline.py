"""Pages in, page results out: batching page jobs through an engine and parsing with the task.

    pages.iter_pages -> transcribe(engine, task, ...) -> (job, PageResult)
                        (pages.prefetch inside: render and preprocess ahead, the one look-ahead stage)

Items come out in the order they went in (stdout output stays in document order); error items
pass straight through with no result."""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Iterator

from .confidence import TokenScores
from .engine import Engine, Job, Output
from .models.generation import LoopCheck
from .pages import ErrorJob, InputOrder, PageJob, prefetch
from .results import PageResult
from .tasks import Task
from .tasks.repetition import WINDOW, find_loop, may_loop


def _keep_before_loop(ids: list[int]) -> int | None:
    """How many ids to keep when the generation has fallen into an exact loop, else None."""
    loop = find_loop(ids)
    return None if loop is None else loop.keep


LOOP_GUARD = LoopCheck(_keep_before_loop, WINDOW, may_loop)


OUT_OF_MEMORY = "out of GPU memory on a single page: lower --max-new-tokens or --dpi, or use --device cpu"


def transcribe(
    engine: Engine | Callable[[], Engine],
    task: Task,
    items: Iterable[PageJob | ErrorJob],
    *,
    prompt: str | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    on_page: Callable[[PageResult, int], None] | None = None,
    lookahead: int | None = None,
    ordered: bool = True,
) -> Iterator[tuple[PageJob | ErrorJob, PageResult | None]]:
    """Run the task on every page with continuous batching (`batch_size` slots, None: as many as fit,
    `Engine.auto_batch_size`); yield (item, result) in input order. Error items and skipped pages come
    out with result None.

    ``engine`` may be a function that loads one: it is called once a rendered page needs the model, so
    the items before come out first and a run whose pages are all done or all failed loads nothing.
    Pages are rendered and preprocessed ahead in background threads, the run's one look-ahead stage
    (`pages.prefetch`: `lookahead` pages, default twice the slots and at least 4, and bounded in bytes).
    On out-of-memory the engine backs off (`Engine.stream_backing_off`): nothing is lost, and a page
    that runs out of memory alone gets an error result. Every item that goes in comes out: the end
    checks it. `on_page(result, new_tokens)` is called as each page finishes (progress reporting).
    Not ``ordered``: each item comes out as soon as it is done (`InputOrder`)."""
    prompt = task.prompt if prompt is None else prompt
    limit = task.max_new_tokens if max_new_tokens is None else max_new_tokens
    preparer = _Preparer(engine if isinstance(engine, Engine) else None)
    depth = max(4, 2 * (batch_size or 8)) if lookahead is None else lookahead
    rendered = prefetch(items, depth=depth, prepare=preparer)
    for first in rendered:
        if _needs_model(first):
            break
        yield first, None
    else:
        return  # nothing needed the model
    if preparer.engine is None:
        preparer.engine = engine()
    engine = preparer.engine
    slots = slots_for(engine, task, prompt, batch_size, limit)
    order = InputOrder(ordered)  # items pulled, waiting for their turn
    source = _pages_for_model(itertools.chain([first], rendered), order)
    pages: dict[int, PageJob] = {}  # pages taken from the source and not finished

    def jobs() -> Iterator[Job]:
        for page in source:
            pages[id(page)] = page
            if page.prepared is None:  # rendered before the engine was loaded
                page.prepared = engine.prepare(page.image)
            prepared, page.prepared = page.prepared, None  # the job holds it until the page is done
            yield Job(id(page), prepared, prompt, limit)

    for key, out in engine.stream_backing_off(jobs(), slots=slots, max_prompt_tokens=engine.prompt_length(prompt),
                                              max_new_tokens=limit, loop_check=LOOP_GUARD):
        page = pages.pop(key)
        if out is None:
            result = PageResult.failed(page.source, page.page, task.name, engine.name, OUT_OF_MEMORY)
        else:
            result = page_result(engine, task, page, out, prompt)
            if on_page is not None:
                on_page(result, len(out.ids))
        order.finish(key, page, result)
        yield from order.ready()
    yield from order.ready()
    order.check_drained()


def slots_for(engine: Engine, task: Task, prompt: str | None, batch_size: int | None, max_new_tokens: int | None) -> int:
    """A run's decode slots: ``batch_size``, else as many as fit (`Engine.auto_batch_size`)."""
    prompt = task.prompt if prompt is None else prompt
    limit = task.max_new_tokens if max_new_tokens is None else max_new_tokens
    return batch_size or engine.auto_batch_size(prompt, limit)


def _needs_model(item: PageJob | ErrorJob) -> bool:
    return isinstance(item, PageJob) and not item.skipped


def _pages_for_model(items: Iterator[PageJob | ErrorJob], order: InputOrder) -> Iterator[PageJob]:
    """The pages of ``items`` that need the model; every item pulled is added to ``order``."""
    for item in items:
        needs_model = _needs_model(item)
        order.add(item, id(item) if needs_model else None)
        if needs_model:
            yield item


class _Preparer:
    """The look-ahead's ``prepare``: the engine's once there is one. Pages rendered before the engine
    was loaded (at most the look-ahead's depth) are prepared when they are admitted."""

    def __init__(self, engine: Engine | None):
        self.engine = engine

    def __call__(self, image):
        engine = self.engine  # set once, from the consumer's thread
        return None if engine is None else engine.prepare(image)


def page_result(engine: Engine, task: Task, page: PageJob, out: Output, prompt: str) -> PageResult:
    """The record of a page the engine has done: the task's fields parsed from its text, with the
    confidence of the page and of its parts."""
    shown = prompt if task.caption_task else ""  # the caption's start is the prompt's end
    raw = shown + out.text
    starts = engine.token_starts(out.ids, out.text)
    scores = TokenScores(None if starts is None else [len(shown) + s for s in starts], out.logprobs)
    page_size = page.size or page.image.size  # the full page: the image may be a smaller working copy
    return PageResult(
        source=page.source, page=page.page, task=task.name, model=engine.name,
        width=page_size[0], height=page_size[1], raw=raw, truncated=out.truncated,
        confidence=scores.page, new_tokens=len(out.logprobs),
        **task.parse(raw, out.model_size, page_size, scores),
    )
