"""Pages in, page results out: batching page jobs through an engine and parsing with the task.

    pages.iter_pages -> transcribe(engine, task, ...) -> (job, PageResult)
                        (pages.prefetch inside: render and preprocess ahead, the one look-ahead stage)
    PageStream(engine, ...).put(key, page, task, prompt, budget) -> deliver(key, PageResult)
                        (a server's open-ended stream: pages of many requests, each its own task)

Items come out in the order they went in (stdout output stays in document order); error items
pass straight through with no result."""

from __future__ import annotations

import itertools
import logging
import threading
from typing import Any, Callable, Iterable, Iterator

import torch

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

_log = logging.getLogger("kosmos.server")  # PageStream's: a server's batch


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


class PageStream:
    """One engine's stream of pages that outlives them (a server's, in its process or in a worker
    process): `put` pages, each with its own task, prompt and token budget, from any thread; `run`
    decodes them in the calling thread until `close`, and ``deliver(key, result)`` hears each page's
    record as it is done (from that thread; a page that cannot be rendered, from `put`'s).

    Running out of memory halves the slots and queues the pages in flight again, first: their records
    do not change (greedy decoding); a page that runs out of memory alone fails. Any other failure of
    the batch fails the pages it held, and the stream goes on. `cancel` drops a page: queued, or
    running (its slot is freed at the next host sync); a cancelled page is not delivered."""

    def __init__(self, engine: Engine, *, slots: int, max_prompt_tokens: int, max_new_tokens: int,
                 deliver: Callable[[Any, PageResult], None]):
        self.engine, self.deliver = engine, deliver
        self.slots = slots  # halved each time the batch runs out of memory
        self.jobs = engine.job_queue(max_prompt_tokens, max_new_tokens)
        self._pages: dict[Any, tuple[PageJob, Task, Job]] = {}  # key -> page put and not yet delivered
        self._lock = threading.Lock()

    def put(self, key: Any, page: PageJob, task: Task, prompt: str, max_new_tokens: int) -> None:
        """Render (unless it is) and prepare a page in the calling thread, and queue it. A page that
        cannot be rendered or prepared, or is beyond the stream's bounds, is delivered failed at once."""
        try:
            loaded = page.load()
            if isinstance(loaded, ErrorJob):
                raise _Unusable(loaded.error)
            job = Job(key, self.engine.prepare(page.image), prompt, max_new_tokens)
            page.image = page.document = None  # the record needs only its size
            with self._lock:
                self._pages[key] = (page, task, job)
            self.jobs.put(job)
        except Exception as err:
            with self._lock:
                self._pages.pop(key, None)
            why = str(err) if isinstance(err, _Unusable) else f"{type(err).__name__}: {err}"
            self.deliver(key, PageResult.failed(page.source, page.page, task.name, self.engine.name, why))

    def cancel(self, key: Any) -> None:
        with self._lock:
            self._pages.pop(key, None)
        self.jobs.cancel(key)

    def close(self) -> None:
        """Take no more pages: `run` returns once those put are done."""
        self.jobs.close()

    def __len__(self) -> int:
        """Pages waiting for a slot."""
        return len(self.jobs)

    def run(self) -> None:
        while True:
            try:
                for key, out in self.engine.stream(self.jobs, slots=self.slots, loop_check=LOOP_GUARD):
                    self._done(key, out)
                return  # closed
            except torch.OutOfMemoryError:
                failure = OUT_OF_MEMORY if self.slots == 1 else None
            except Exception as err:
                _log.exception("the batch failed")
                failure = f"{type(err).__name__}: {err}"
            # Outside the except blocks, whose tracebacks hold the failed batch's tensors.
            self.engine.release_memory()
            with self._lock:
                taken = [key for key in self._pages if not self.jobs.is_waiting(key)]
            if failure is None:
                self.slots //= 2
                _log.warning(f"out of memory: decoding {self.slots} pages at a time from now on")
                with self._lock:
                    again = [self._pages[key][2] for key in taken if key in self._pages]
                self.jobs.put_again(again)
            else:
                for key in taken:
                    self._done(key, None, failure)

    def _done(self, key: Any, out: Output | None, failure: str | None = None) -> None:
        with self._lock:
            found = self._pages.pop(key, None)
        if found is None:  # cancelled
            return
        page, task, job = found
        if out is None:
            result = PageResult.failed(page.source, page.page, task.name, self.engine.name, failure)
        else:
            try:
                result = page_result(self.engine, task, page, out, job.prompt)
            except Exception as err:  # one page's failure, not the stream's
                _log.exception("page %s of %s", page.page, page.source)
                result = PageResult.failed(page.source, page.page, task.name, self.engine.name,
                                           f"{type(err).__name__}: {err}")
        self.deliver(key, result)


class _Unusable(Exception):
    """A page that cannot be rendered: the reason, in the command's words."""
