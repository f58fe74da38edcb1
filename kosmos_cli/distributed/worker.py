"""The one path from a page reference to a record, whatever runs it (a local process, later a Ray actor).

    PageRef (picklable: where the page is)  ->  Worker.run  ->  Record (the page job and its PageResult)

A `Worker` loads its engine once (`EngineSpec`), opens each document itself, renders, prepares and
decodes with the same continuous batching as a single-device run (`pipeline.transcribe`), so a page's
result does not depend on which worker did it. It knows nothing of processes or queues.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

from ..documents import Document, DocumentError, open_document
from ..pages import ErrorJob, PageJob
from ..results import PageResult
from ..tasks import TASKS, WrongModel

__all__ = ["EngineSpec", "LoadFailure", "Opener", "PageRef", "Record", "Worker"]


@dataclass(frozen=True)
class PageRef:
    """One page to process, as plain data: the document, its output stem, the 1-based page, the
    document's page count and selected pages (so sinks know when it is complete), and how to open it;
    for a server's page, which carries its own, the task's name, the prompt and the token budget."""

    source: Path
    stem: str
    page: int
    num_pages: int
    selected: tuple[int, ...]
    dpi: float
    password: str | None = None
    task: str | None = None
    prompt: str | None = None
    max_new_tokens: int | None = None

    @classmethod
    def of(cls, job: PageJob, dpi: float, password: str | None, task: str | None = None, prompt: str | None = None,
           max_new_tokens: int | None = None) -> PageRef:
        return cls(job.source, job.stem, job.page, job.num_pages, job.selected, dpi, password, task, prompt,
                   max_new_tokens)


@dataclass(frozen=True)
class EngineSpec:
    """How a worker loads its engine: the arguments of `kosmos_cli.load`, one device."""

    model: str
    device: str
    dtype: str = "auto"
    compile: bool | str = "auto"
    attention: str = "auto"

    def load(self):
        from ..engine import load

        return load(self.model, device=self.device, dtype=self.dtype, compile=self.compile, attention=self.attention)


class LoadFailure(NamedTuple):
    """Why a worker has no engine, as its driver tells the user (one line, no traceback):
    ``wrong_model`` when the model does not fit the task (a usage error, exit 2)."""

    message: str
    wrong_model: bool

    @classmethod
    def of(cls, err: Exception, model: str) -> LoadFailure:
        """What the Worker's constructor raised."""
        if isinstance(err, WrongModel):
            return cls(str(err), True)
        reason = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
        return cls(f"cannot load model {model}: {reason}", False)


class Record(NamedTuple):
    """One page done: the caller's key, the page job (rendered size and notes; the working image only
    for a worker that keeps images) or the ErrorJob of a page that could not be rendered, its result
    (None for an ErrorJob) and the tokens decoded."""

    key: Any
    item: PageJob | ErrorJob
    result: PageResult | None
    new_tokens: int


class Worker:
    """One engine on one device, and the pages it is given.

    ``task`` is a task name (ocr, md, ground); ``prompt``, ``batch_size`` and ``max_new_tokens`` are
    `pipeline.transcribe`'s, and ``slots`` the decode slots every run has (``batch_size``, or as many
    as fit once the engine is loaded). ``keep_images`` sends each page's working image back in its
    record (overlays are drawn by whoever writes the outputs). Raises ValueError if the model does not
    fit the task (`WrongModel`), and what `kosmos_cli.load` raises if it cannot be loaded."""

    def __init__(self, spec: EngineSpec, task: str, *, prompt: str | None = None, batch_size: int | None = None,
                 max_new_tokens: int | None = None, keep_images: bool = False):
        from ..pipeline import slots_for

        self.task = TASKS[task]
        self.engine = spec.load()
        self.task.check_model(self.engine.kind, spec.model)
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.slots = slots_for(self.engine, self.task, prompt, batch_size, max_new_tokens)
        self.keep_images = keep_images

    def run(self, refs: Iterable[tuple[Any, PageRef]], ordered: bool = True) -> Iterator[Record]:
        """Process ``(key, ref)`` pairs, pulled lazily as batch slots free up (plus the look-ahead);
        yields one Record per pair, in the order they came (not ``ordered``: as each is done)."""
        from ..pipeline import transcribe

        # (source, page) -> the keys of its pairs not yet done, first come first out: filled by the
        # look-ahead's thread, emptied here (a page given twice has two keys and the same result).
        keys: dict[tuple[Path, int | None], deque] = {}
        lock = threading.Lock()
        tokens: dict[int, int] = {}
        opener = Opener()

        def jobs() -> Iterator[PageJob | ErrorJob]:
            for key, ref in refs:
                with lock:
                    keys.setdefault((ref.source, ref.page), deque()).append(key)
                yield opener.job(ref)

        def key_of(item: PageJob | ErrorJob) -> Any:
            with lock:
                waiting = keys[item.source, item.page]
                key = waiting.popleft()
                if not waiting:
                    del keys[item.source, item.page]
            return key

        def count(result: PageResult, new_tokens: int) -> None:
            tokens[id(result)] = new_tokens

        try:
            for item, result in transcribe(self.engine, self.task, jobs(), prompt=self.prompt,
                                           batch_size=self.slots, max_new_tokens=self.max_new_tokens,
                                           on_page=count, ordered=ordered):
                if isinstance(item, PageJob):
                    item.document = item.prepared = None
                    if not self.keep_images:
                        item.image = None
                yield Record(key_of(item), item, result, tokens.pop(id(result), 0))
        finally:
            opener.close()


class Opener:
    """Page jobs from page references. The last document opened stays open while its pages keep
    coming (its own claim, given back when another document comes); each job claims a render too, so a
    document closes once it is left behind and its last page is rendered."""

    def __init__(self):
        self.document: Document | None = None
        self.opened: tuple | None = None

    def job(self, ref: PageRef) -> PageJob | ErrorJob:
        if self.opened != (ref.source, ref.dpi, ref.password):
            self.close()
            try:
                self.document = open_document(ref.source, ref.dpi, ref.password)
            except DocumentError as exc:  # gone or changed since the pages were listed
                return ErrorJob(ref.source, ref.stem, ref.page, exc.reason, selected=ref.selected)
            self.document.claim()
            self.opened = (ref.source, ref.dpi, ref.password)
        self.document.claim()
        return PageJob(ref.source, ref.stem, ref.page, ref.num_pages, ref.selected, self.document)

    def close(self) -> None:
        if self.document is not None:
            self.document.release()
        self.document = self.opened = None
