"""The bridge between a server's requests and its one running batch.

    bridge = Bridge(engine, slots=8, max_new_tokens=3072)
    submission = bridge.submit(Upload(path, "scan.pdf", TASKS["ocr"], "<ocr>"))   # DocumentError: 422
    submission.pages                      # how many records will come
    for record in submission.records():  # page order, each as soon as it and those before it are done
        ...
    submission.cancel()                   # a client gone: its queued pages dropped, running rows freed

Every request's pages go into the engine's one stream (`pipeline.PageStream`), whatever the number
of clients: that is what continuous batching is for. Its batch thread turns outputs into records
(`pipeline.page_result`, the command's own), and the feeder renders and prepares pages, taking one
page from each request in turn (a 1,000-page upload does not hold back a one-page request behind it),
and only while fewer than ``ahead`` pages wait for a slot: the rendered pages the server holds are
bounded for the whole server, not per request. On several devices the pages go to worker processes
instead (`distributed.local.WorkerPool`, the driver of the command's multi-device runs), each with
such a stream: the feeder sends each page, unrendered, to the worker with the fewest in flight.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..distributed.pool import WorkerPool
from ..distributed.worker import EngineSpec, PageRef
from ..documents import DocumentError, open_document
from ..engine import Checkpoint
from ..inputs import InputFile, PageSelection
from ..pages import ErrorJob, PageJob, iter_pages
from ..pipeline import PageStream
from ..results import PageResult
from ..tasks import Task

__all__ = ["Bridge", "PromptTooLong", "Submission", "TooManyPages", "Upload"]

log = logging.getLogger("kosmos.server")
_END = object()  # the last item of a submission's records


class TooManyPages(ValueError):
    pass


class PromptTooLong(ValueError):
    pass


@dataclass
class Upload:
    """What one request asks: a file the server keeps privately (``path``), the name the client gave
    it (a label for the records' ``source``, never a path), the task and its prompt, and the page
    selection, resolution, password and token budget."""

    path: Path
    name: str
    task: Task
    prompt: str
    pages: PageSelection | None = None
    dpi: float = 200.0
    password: str | None = None
    max_new_tokens: int | None = None


class Submission:
    """One request's pages on their way through the batch."""

    def __init__(self, bridge: Bridge, upload: Upload, pages: int):
        self.bridge, self.upload, self.pages = bridge, upload, pages
        self.id = next(bridge.ids)
        self.cancelled = False
        self._items: Iterator[PageJob | ErrorJob] | None = iter_pages(
            [InputFile(upload.path, "upload")], upload.pages, upload.dpi, upload.password,
            render=isinstance(bridge.pages, PageStream))  # else the workers render
        self._listed = 0  # pages taken from the document, each with its index in page order
        self._done: dict[int, PageResult] = {}
        self._next = 0  # the index of the next record to hand out
        self._out: queue.Queue = queue.Queue()

    def records(self) -> Iterator[PageResult]:
        """The records in page order, each as soon as it and those before it are done (blocking)."""
        while (record := self._out.get()) is not _END:
            yield record

    def next_record(self, timeout: float | None = None) -> PageResult | None:
        """The next record, None at the end; queue.Empty after ``timeout`` seconds without one."""
        record = self._out.get(timeout=timeout)
        return None if record is _END else record

    def cancel(self) -> None:
        self.bridge._cancel(self)

    # The bridge's side (under its lock) ----------------------------------------------------------

    def _take(self) -> tuple[int, PageJob | ErrorJob] | None:
        """The next page of the document and its index; None when there are no more."""
        if self._items is None:
            return None
        for item in self._items:
            if isinstance(item, ErrorJob) and item.warning:  # a note (pages past the end): no record
                continue
            index, self._listed = self._listed, self._listed + 1
            return index, item
        self._close_items()
        return None

    def _close_items(self) -> None:
        if self._items is not None:
            self._items.close()
            self._items = None

    def _finish(self, index: int, record: PageResult) -> None:
        self._done[index] = record
        while self._next in self._done:
            self._out.put(self._done.pop(self._next))
            self._next += 1
        if self._items is None and self._next == self._listed:
            self._out.put(_END)


class Bridge:
    """Every request's pages fed to one engine's stream (see the module docstring). ``slots``: rows
    decoded together (None with ``workers``: as many as fit, each worker its own); ``max_new_tokens``:
    the most a request may ask for (the KV cache is sized for it); ``max_prompt_tokens``: the longest
    prompt a request may bring (a chat question past it is refused); ``ahead``: pages rendered and
    waiting for a slot, for the whole server.

    ``workers`` None: the engine runs here, its batch in a thread of this process. Else the engines of
    worker processes, one a device (`distributed.local.WorkerPool`: they render, prepare and decode,
    and ``engine`` is only the model's `Checkpoint`, for its name and prompt lengths); raises
    WorkersLost if none of them loads."""

    def __init__(self, engine: Checkpoint, *, slots: int | None, max_new_tokens: int, max_prompt_tokens: int,
                 ahead: int | None = None, on_page: Callable[[PageResult, float], None] | None = None,
                 workers: list[EngineSpec] | None = None):
        self.engine, self.max_new_tokens, self.max_prompt_tokens = engine, max_new_tokens, max_prompt_tokens
        self.on_page = on_page
        self.ids = itertools.count(1)
        self._active: deque[Submission] = deque()  # round-robin order of requests with pages to render
        self._running: dict[tuple[int, int], tuple[Submission, float]] = {}  # key -> whose, since when
        self._lock = threading.Condition()
        self._closed = False
        self._batch: threading.Thread | None = None
        if workers is None:
            self.pages: PageStream | WorkerPool = PageStream(
                engine, slots=slots, max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                deliver=self._deliver)
            self._batch = threading.Thread(target=self.pages.run, name="kosmos-batch", daemon=True)
            self._batch.start()
        else:
            self.pages = WorkerPool(workers, slots=slots, max_prompt_tokens=max_prompt_tokens,
                                    max_new_tokens=max_new_tokens, deliver=self._deliver, log=log.info)
        self.ahead = ahead or max(4, self.slots)
        self._feeder = threading.Thread(target=self._feed, name="kosmos-feeder", daemon=True)
        self._feeder.start()

    def submit(self, upload: Upload, max_pages: int | None = None) -> Submission:
        """Queue a request's pages; raises, before anything is queued, DocumentError (with the
        command's words) for a file that cannot be opened or has no page the selection names,
        TooManyPages past ``max_pages``, and PromptTooLong for a prompt past the stream's bound."""
        length = self.engine.prompt_length(upload.prompt)
        if length > self.max_prompt_tokens:
            raise PromptTooLong(f"the prompt is too long: {length} tokens with the image's, and this server takes "
                                f"{self.max_prompt_tokens}")
        with open_document(upload.path, upload.dpi, upload.password) as document:
            count = document.num_pages
        pages = len(upload.pages.select(count)[0]) if upload.pages is not None else count
        if pages == 0:
            raise DocumentError(upload.name, f"the selection names none of its {count} pages")
        if max_pages is not None and pages > max_pages:
            raise TooManyPages(f"{upload.name}: {pages} pages, more than this server takes ({max_pages})")
        submission = Submission(self, upload, pages)
        with self._lock:
            if self._closed:
                raise RuntimeError("the server is stopping")
            self._active.append(submission)
            self._lock.notify_all()
        return submission

    def close(self, timeout: float | None = None) -> None:
        """Take no more requests; the batch ends once the pages queued are done."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._feeder.join(timeout)
        self.pages.close()
        if self._batch is not None:
            self._batch.join(timeout)

    def abort(self, reason: str) -> None:
        """End every request now: its pages not done are dropped, and its records end with a failure
        record (page 0) that says why and how many pages did not come."""
        with self._lock:
            submissions = {s for s, _ in self._running.values()} | set(self._active)
            for submission in submissions:
                if not submission.cancelled:
                    missing = submission.pages - submission._next
                    submission._out.put(PageResult.failed(
                        submission.upload.name, 0, submission.upload.task.name, self.engine.name,
                        f"{reason}: {missing} page{'s' * (missing != 1)} not done"))
        for submission in submissions:
            self._cancel(submission)

    @property
    def slots(self) -> int:
        """Rows decoded together now, every worker's."""
        return self.pages.slots

    @property
    def busy(self) -> int:
        """Pages in the batch or waiting for a slot."""
        with self._lock:
            return len(self._running)

    @property
    def waiting(self) -> int:
        """Requests with pages not yet queued for the batch."""
        with self._lock:
            return len(self._active)

    def _cancel(self, submission: Submission) -> None:
        with self._lock:
            submission.cancelled = True
            submission._close_items()
            if submission in self._active:
                self._active.remove(submission)
            for key in [k for k, (s, _) in self._running.items() if s is submission]:
                del self._running[key]
                self.pages.cancel(key)
            submission._out.put(_END)

    def _feed(self) -> None:
        """Render and prepare pages, one request's at a time in turn, while fewer than ``ahead`` wait."""
        while True:
            with self._lock:
                while not self._closed and (not self._active or len(self.pages) >= self.ahead):
                    self._lock.wait(0.05)  # a slot taken frees room without telling us: look again soon
                if self._closed and not self._active:
                    return
                if not self._active:
                    continue
                submission = self._active.popleft()
                taken = submission._take()
                if taken is None:
                    if submission._next == submission._listed:
                        submission._out.put(_END)
                    continue
                self._active.append(submission)
            index, item = taken
            self._start(submission, index, item)

    def _start(self, submission: Submission, index: int, item: PageJob | ErrorJob) -> None:
        """Queue one page (outside the lock: rendering it here takes time)."""
        upload = submission.upload
        key = (submission.id, index)
        if isinstance(item, ErrorJob):
            record = PageResult.failed(upload.name, item.page or 0, upload.task.name, self.engine.name, item.error)
            with self._lock:
                if not submission.cancelled:
                    submission._finish(index, record)
            return
        with self._lock:
            if submission.cancelled:
                return
            self._running[key] = (submission, time.monotonic())
        # Within the stream's bounds: submit checked the prompt, and the budget is capped here.
        limit = min(upload.max_new_tokens or upload.task.max_new_tokens, self.max_new_tokens)
        if isinstance(self.pages, PageStream):
            self.pages.put(key, item, upload.task, upload.prompt, limit)
        else:
            self.pages.put(key, PageRef.of(item, upload.dpi, upload.password, upload.task.name, upload.prompt, limit))

    def _deliver(self, key: tuple[int, int], result: PageResult) -> None:
        with self._lock:
            found = self._running.pop(key, None)
        if found is None:  # cancelled
            return
        submission, queued = found
        record = dataclasses.replace(result, source=submission.upload.name)
        if self.on_page is not None:
            self.on_page(record, time.monotonic() - queued)
        with self._lock:
            if not submission.cancelled:
                submission._finish(key[1], record)
