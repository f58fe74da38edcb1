"""Page jobs and the look-ahead that renders them.

    iter_pages(files, parse_pages("1-3,7"), dpi=200)  ->  PageJob | ErrorJob, lazily, in order
    prefetch(jobs, depth=4, prepare=engine.prepare)  ->  the same items, rendered (and prepared for
                                                         the model) ahead in background threads

`iter_pages` opens one document at a time and yields a `PageJob` per selected page; each job that
will be rendered holds a claim on its document (`Document.claim`), which its `load` gives back, so the
last render closes the document. `prefetch` is the one look-ahead stage of a run: it renders, and
preprocesses for the model, in background threads through a window bounded by a number of pages and
by bytes, so memory stays bounded whatever the page count and page size.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from . import documents
from .documents import DEFAULT_DPI, MAX_PIXELS, Document, DocumentError
from .inputs import InputFile, PageSelection, assign_stems, format_ranges

__all__ = ["PREFETCH_BYTES", "ErrorJob", "InputOrder", "PageJob", "iter_pages", "prefetch"]

# Rendered pages that `prefetch` may hold ahead of the consumer, in bytes: 15 working images at the
# full WORK_PIXELS, far more small ones (the page count `depth` bounds those).
PREFETCH_BYTES = 256 << 20


# --------------------------------------------------------------------------------------------------
# Page jobs
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ErrorJob:
    """A document or page that produced no image. ``page`` is None for a whole-document failure.

    ``warning`` marks notes that are not failures (pages requested past a document's end).
    ``selected`` is the document's page selection for a page failure (as on `PageJob`), so the
    document can still be assembled around the failed page.
    """

    source: Path
    stem: str
    page: int | None
    error: str
    warning: bool = False
    selected: tuple[int, ...] = ()

    @property
    def is_last(self) -> bool:
        """True for a failure of the document's last selected page."""
        return self.page is not None and bool(self.selected) and self.page == self.selected[-1]

    def __str__(self) -> str:
        where = f" (page {self.page})" if self.page is not None else ""
        return f"{self.source}{where}: {self.error}"


@dataclass(eq=False)
class PageJob:
    """One page to process. ``image`` is None until `load` (or `prefetch`) renders it.

    After loading, ``image`` is the working image (at most `WORK_PIXELS`, what the model reads and
    overlays are drawn on), ``size`` the page's full pixel size at the requested resolution (results'
    coordinates are scaled to it) and ``notes`` decoder warnings to report (not failures).
    ``selected`` lists the document's selected pages (ascending), so a consumer knows when the
    document is complete; ``skipped`` pages (already done, per iter_pages' ``skip``) are never rendered.
    A job built with an image already in memory has that image's size.
    """

    source: Path
    stem: str
    page: int  # 1-based
    num_pages: int
    selected: tuple[int, ...]
    document: Document | None = field(default=None, repr=False)
    image: Image.Image | None = field(default=None, repr=False)
    skipped: bool = False
    size: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)
    prepared: Any = field(default=None, repr=False)  # the model's input for ``image`` (prefetch's ``prepare``)
    _released: bool = field(default=False, repr=False)  # this job's claim on ``document`` given back

    def __post_init__(self) -> None:
        if self.image is not None and self.size is None:
            self.size = self.image.size

    @property
    def is_last(self) -> bool:
        """True for the document's last selected page."""
        return self.page == self.selected[-1]

    def load(self) -> PageJob | ErrorJob:
        """Render the image (once); returns self, or an ErrorJob if the page cannot be rendered."""
        if self.image is not None or self.skipped or self.document is None:
            return self
        try:
            rendered = self.document.page(self.page - 1)
        except DocumentError as exc:
            return ErrorJob(self.source, self.stem, self.page, exc.reason, selected=self.selected)
        except Exception as exc:  # MemoryError, pdfium surprises: a page failure, not a stream failure
            return ErrorJob(self.source, self.stem, self.page, f"{type(exc).__name__}: {exc}", selected=self.selected)
        finally:
            if not self._released:  # the claim iter_pages took for this page: the last one closes the document
                self._released = True
                self.document.release()
        self.image, self.size, self.notes = rendered.image, rendered.size, list(rendered.notes)
        return self


def iter_pages(
    inputs: Iterable[InputFile | str | os.PathLike],
    pages: PageSelection | None = None,
    dpi: float = DEFAULT_DPI,
    password: str | None = None,
    *,
    skip: Callable[[PageJob], bool] | None = None,
    max_pixels: int = MAX_PIXELS,
    render: bool = True,
) -> Iterator[PageJob | ErrorJob]:
    """Lazily yield one PageJob per selected page, in order, opening one document at a time.

    Images are not rendered here (call ``job.load()`` or wrap in `prefetch`). Failures become
    ErrorJobs (page None): a document that cannot be opened, or whose pages the selection misses
    entirely; pages requested past its end while others exist, and the document's own `notes` (an XFA
    form not drawn), are notes (``warning=True``), the latter only when some page is to be rendered.
    ``skip(job)`` → True marks a page as already done: it is yielded with ``skipped=True`` and never
    rendered. Bare paths get stems from `assign_stems` over all given inputs.
    A document is closed when its last page job has been loaded, or when this generator is closed early.
    ``render=False`` lists the pages only: each document is closed once its jobs are built, and the
    jobs hold none (`kosmos_cli.distributed` sends them as page references to workers that render).
    """
    items = list(inputs)
    bare = [i for i, x in enumerate(items) if not isinstance(x, InputFile)]
    if bare:
        stems = assign_stems([Path(items[i]) for i in bare])
        for i, s in zip(bare, stems):
            items[i] = InputFile(Path(items[i]), s)
    open_docs: list[Document] = []
    try:
        for item in items:
            try:
                doc = documents.open_document(item.path, dpi, password, max_pixels=max_pixels)
            except DocumentError as exc:
                yield ErrorJob(item.path, item.stem, None, exc.reason)
                continue
            n = doc.num_pages
            if pages is None:
                selected, missing = list(range(1, n + 1)), []
            else:
                selected, missing = pages.select(n)
            if not selected:
                doc.close()
                yield ErrorJob(
                    item.path, item.stem, None,
                    f"no page of the selection {pages} exists ({n} page{'s' * (n != 1)})",
                )
                continue
            if missing:
                what = "page" if len(missing) == 1 and missing[0][0] == missing[0][1] else "pages"
                yield ErrorJob(
                    item.path, item.stem, None,
                    f"{what} {format_ranges(missing)} not in document ({n} page{'s' * (n != 1)})",
                    warning=True,
                )
            # A deque we pop from, so that no reference to a yielded (and later rendered) job stays here.
            jobs = deque(PageJob(item.path, item.stem, p, n, tuple(selected), doc) for p in selected)
            for job in jobs:
                if skip is not None and skip(job):
                    job.skipped = True
            renders = sum(not j.skipped for j in jobs)
            notes = doc.notes if renders else ()  # a document with nothing left to render says nothing
            if not render:  # listing only: whoever renders opens the document again
                doc.close()
                for job in jobs:
                    job.document = None
            elif renders == 0:
                doc.close()
            else:
                doc.claim(renders)  # one claim a page to render, given back by its load
                open_docs[:] = [d for d in open_docs if not d.closed]
                open_docs.append(doc)
            del doc
            for note in notes:  # the document's notes, here once, wherever its pages are rendered
                yield ErrorJob(item.path, item.stem, None, note, warning=True)
            while jobs:
                yield jobs.popleft()
    except GeneratorExit:
        # Stopped early: nobody will load the remaining pages.
        for d in open_docs:
            d.close()
        raise


class InputOrder:
    """A run's items in the order they came, each held back until its result is in: what keeps
    stdout and the documents in input order whoever finishes first (one engine, several workers,
    Ray actors). An item added without a key needs no result and passes as soon as its turn comes.
    Not ``ordered``: each item passes as soon as its result is in (a Ray actor's pages, which carry
    their own keys, so that a long page does not hold back those after it)."""

    def __init__(self, ordered: bool = True):
        self.ordered = ordered
        self._items: deque[tuple[Any, PageJob | ErrorJob]] = deque()  # (key or None, item)
        self._done: dict[Any, tuple[PageJob | ErrorJob, Any]] = {}  # key -> (item, result), not yet out

    def add(self, item: PageJob | ErrorJob, key: Any = None) -> None:
        self._items.append((key, item))

    def finish(self, key: Any, item: PageJob | ErrorJob, result) -> None:
        """The result for ``key``; ``item`` replaces the one added (a worker returns its own copy)."""
        self._done[key] = (item, result)

    def ready(self) -> Iterator[tuple[PageJob | ErrorJob, Any]]:
        """(item, result) for the items whose turn has come, in order (result None without a key)."""
        if not self.ordered:
            ready = [(key, item) for key, item in self._items if key is None or key in self._done]
            if ready:
                self._items = deque((key, item) for key, item in self._items if key is not None and key not in self._done)
            for key, item in ready:
                yield self._done.pop(key) if key is not None else (item, None)
            return
        while self._items and (self._items[0][0] is None or self._items[0][0] in self._done):
            key, item = self._items.popleft()
            yield self._done.pop(key) if key is not None else (item, None)

    def __len__(self) -> int:
        """Items not yet out."""
        return len(self._items)

    def check_drained(self) -> None:
        """At the end of a run every item added has come out; raise RuntimeError naming the first one
        that has not (a page lost on the way, which must never end a run quietly)."""
        if self._items:
            raise RuntimeError(f"internal error: {self._items[0][1]} and {len(self._items) - 1} more items "
                               "never came out")


# --------------------------------------------------------------------------------------------------
# Prefetch
# --------------------------------------------------------------------------------------------------

_DONE = object()


def _load(item, prepare: Callable[[Image.Image], Any] | None = None):
    if not isinstance(item, PageJob):
        return item
    item = item.load()
    if prepare is not None and isinstance(item, PageJob) and item.image is not None and item.prepared is None:
        item.prepared = prepare(item.image)
    return item


def _held_bytes(item) -> int:
    """Memory a loaded item holds: its image, at the 4 bytes a pixel Pillow keeps RGB in, and its
    prepared model input (``nbytes`` where it has one)."""
    image = getattr(item, "image", None)
    held = image.width * image.height * 4 if isinstance(image, Image.Image) else 0
    return held + getattr(getattr(item, "prepared", None), "nbytes", 0)


def prefetch(items: Iterable, depth: int = 4, workers: int = 2, *, max_bytes: int = PREFETCH_BYTES,
             prepare: Callable[[Image.Image], Any] | None = None) -> Iterator:
    """Render pages ahead in background threads; yields the same items, in order, loaded, and with
    ``prepare`` given, each rendered page's ``prepared`` set to ``prepare(image)`` in the same thread.

    A feeder thread pulls from ``items`` (opening documents) and hands ``job.load()`` to ``workers``
    render threads. The items pulled but not yet handed to the consumer are at most ``depth``, those
    being rendered at most ``workers``, and no item is pulled while the rendered ones waiting hold
    ``max_bytes`` or more (one is always allowed, so a page bigger than the budget still passes): memory
    stays bounded by both a page count and bytes, whatever the document size. Page failures arrive as
    ErrorJob items; an exception raised by ``items`` itself is re-raised to the consumer after the items
    before it. Closing the returned generator early (``break``, ``.close()``, a KeyboardInterrupt in the
    consumer, garbage collection) returns at once: renders not started are cancelled, the feeder stops
    and closes ``items``, and a render in flight finishes in its thread. All these threads are daemons,
    so interpreter exit does not wait for them.
    ``depth=0`` loads synchronously in the consumer's thread (no threads at all).
    """
    if depth < 0 or workers < 1:
        raise ValueError(f"need depth >= 0 and workers >= 1, got depth={depth}, workers={workers}")
    if depth == 0:
        return (_load(item, prepare) for item in items)
    return _prefetch(iter(items), depth, workers, max_bytes, prepare)


@dataclass
class _Window:
    """What `_prefetch` holds ahead of its consumer; guarded by ``changed``."""

    changed: threading.Condition = field(default_factory=threading.Condition)
    ahead: int = 0  # items pulled, not yet handed to the consumer
    rendering: int = 0  # of those, not yet loaded
    bytes: int = 0  # held by the loaded ones


def _prefetch(source: Iterator, depth: int, workers: int, max_bytes: int, prepare) -> Iterator:
    window = _Window()
    stop = threading.Event()
    pending: queue.SimpleQueue = queue.SimpleQueue()  # futures in source order, then _DONE
    tasks: queue.SimpleQueue = queue.SimpleQueue()  # (future, item) for the render threads; None ends one
    failure: list[BaseException] = []

    def room() -> bool:
        if stop.is_set() or window.ahead == 0:
            return True
        return window.ahead < depth and window.rendering < workers and window.bytes < max_bytes

    def render() -> None:
        while (task := tasks.get()) is not None:
            future, item = task
            if stop.is_set() or not future.set_running_or_notify_cancel():
                continue
            try:
                result = _load(item, prepare)
            except BaseException as exc:
                result, error = None, exc
            else:
                error = None
            with window.changed:
                window.rendering -= 1
                window.bytes += _held_bytes(result)
                window.changed.notify_all()
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
            del task, future, item, result, error  # a page nobody references must be freed now

    def feed() -> None:
        try:
            while True:
                with window.changed:
                    window.changed.wait_for(room)
                if stop.is_set():
                    break
                try:
                    item = next(source)
                except StopIteration:
                    break
                future: Future = Future()
                with window.changed:
                    window.ahead += 1
                    window.rendering += 1
                pending.put(future)
                tasks.put((future, item))
                del future, item
        except BaseException as exc:  # the source itself failed: hand it to the consumer
            failure.append(exc)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    pass
            pending.put(_DONE)
            for _ in range(workers):
                tasks.put(None)

    threads = [threading.Thread(target=feed, name="kosmos-prefetch", daemon=True)]
    threads += [threading.Thread(target=render, name=f"kosmos-render-{k}", daemon=True) for k in range(workers)]
    for thread in threads:
        thread.start()
    exhausted = False
    try:
        while True:
            future = pending.get()
            if future is _DONE:
                exhausted = True
                break
            item = future.result()
            del future
            with window.changed:
                window.ahead -= 1
                window.bytes -= _held_bytes(item)
                window.changed.notify_all()
            yield item
            del item
        if failure:
            raise failure[0]
    finally:
        # Closed early: never wait, a render in flight may take seconds (a huge page) and a Ctrl-C must
        # stop the run now; renders not started are cancelled and the threads end on their own.
        stop.set()
        with window.changed:
            window.changed.notify_all()
        while True:
            try:
                future = pending.get_nowait()
            except queue.Empty:
                break
            if future is not _DONE:
                future.cancel()
        if exhausted:  # every render was consumed: the threads are ending, leave none behind
            for thread in threads:
                thread.join()
