"""Ray: the same `Worker` on an actor pool, for a cluster (`pip install "ray[data]>=2.60,<2.61"`).

    input paths -> (CPU tasks) page rows -> (actor pool: one Worker an actor) records

`transcribe_dataset` is the pipeline for users who stay in Ray: it returns a Dataset of page records
in the JSONL schema (`record_schema`, so that `write_parquet` takes pages with and without lines).
`transcribe_on_ray` is the CLI's `--ray` run: the driver lists the pages (and skips finished ones),
the actors do the model work, the driver writes every file.

A row carries a pickled `PageRef` (or, for an input that cannot be opened, its failure record), so no
column mixes types. Each actor loads its engine once and keeps one continuous batch (`_Stream`) that
every Ray batch it holds feeds: it runs several batches of `pages_per_call` pages at once (the decode
slots by default; `CALLS_PER_ACTOR` tasks, and a task's batches overlap too, its call being a
coroutine), each batch returns as soon as its own pages are done, and the pages of the others take
the slots it frees, so slots drain only when the actor runs out of pages (benchmarks/ray_slots.py
measures it). A dead actor is restarted and its batches retried (`max_restarts`,
`max_task_retries`): a batch's records come out once, from the attempt that finished. An actor that
cannot load its engine says why in its records, and the CLI's driver stops with that one line
(`WorkersLost`, as the local driver does).

`transcribe_dataset` hands out a document's pages as one listing block, so each document goes to
one actor; `transcribe_on_ray` hands out pages.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import threading
import warnings
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow
import ray

from ..documents import DEFAULT_DPI
from ..inputs import PageSelection
from ..pages import ErrorJob, InputOrder, PageJob, iter_pages
from ..results import PageResult
from ..tasks import TASKS
from .processes import WorkersLost
from .worker import EngineSpec, LoadFailure, PageRef, Record, Worker

__all__ = ["CALLS_PER_ACTOR", "RETRIES", "connect", "record_schema", "transcribe_dataset", "transcribe_on_ray"]

RETRIES = 3  # restarts of a dead actor, and retries of the batches it had
CALLS_PER_ACTOR = 4  # Ray batches an actor runs at once, all feeding its one continuous batch
FEED_WAIT = 0.1  # seconds an actor's batch, short of pages, waits for more before its slots drain
FEED_PATIENCE = 10.0  # seconds it waits for more while it has pages behind its slots (see _Stream._pull)


def connect(address: str | None = None) -> None:
    """Join the cluster at ``address`` (else RAY_ADDRESS, else a new local one) for a command-line run,
    whose stderr is ours: Ray's notes (its cluster's settings, each Dataset's start and end, progress
    bars) stay out of it, and its errors come out as ours."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # read each time Ray Data sets up its loggers
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(os.environ["RAY_DATA_LOG_LEVEL"])  # if set up already


def record_schema() -> pyarrow.Schema:
    """The JSONL schema of a page record as Arrow types: every batch of records has it, whether its
    pages have lines or entities or not (an empty list alone would be a list of nulls) and whether
    any failed (``error``, and null confidences) or none."""
    ints, floats, confidence = pyarrow.list_(pyarrow.int64()), pyarrow.list_(pyarrow.float64()), pyarrow.float64()
    line = pyarrow.struct([("text", pyarrow.string()), ("polygon", ints), ("confidence", confidence),
                           ("word_confidences", floats)])
    entity = pyarrow.struct([("text", pyarrow.string()), ("span", ints), ("boxes", pyarrow.list_(floats)),
                             ("pixel_boxes", pyarrow.list_(ints)), ("confidence", confidence)])
    return pyarrow.schema([
        ("source", pyarrow.string()), ("page", pyarrow.int64()), ("task", pyarrow.string()),
        ("model", pyarrow.string()), ("width", pyarrow.int64()), ("height", pyarrow.int64()),
        ("text", pyarrow.string()), ("confidence", confidence), ("new_tokens", pyarrow.int64()),
        ("lines", pyarrow.list_(line)), ("entities", pyarrow.list_(entity)),
        ("raw", pyarrow.string()), ("truncated", pyarrow.bool_()), ("error", pyarrow.string()),
    ])


def transcribe_dataset(paths: Iterable[str | Path] | ray.data.Dataset, task: str, *, model: str | None = None,
                       workers: int = 1, gpus: bool | None = None, pages: PageSelection | None = None,
                       dpi: float = DEFAULT_DPI, password: str | None = None, prompt: str | None = None,
                       batch_size: int | None = None, max_new_tokens: int | None = None, dtype: str = "auto",
                       compile: bool | str = "auto", attention: str = "auto", pages_per_call: int | None = None,
                       worker: Callable[..., Worker] = Worker) -> ray.data.Dataset:
    """A lazy Dataset of page records (`PageResult.to_dict()`, one row a page, `record_schema()`) for
    ``task`` (ocr, md, ground) over ``paths``: file paths the actors can read, or a Dataset with a
    ``path`` column.

    A document that cannot be opened is one row with ``error`` (page 0). ``workers`` actors, each on
    one GPU when ``gpus`` (default: when the cluster has GPUs), else on one CPU; the other options
    are the command's. An actor that cannot load the model fails the Dataset with the reason. Write
    it with ``.write_parquet(...)`` or ``.write_json(...)``."""
    if not isinstance(paths, ray.data.Dataset):
        paths = ray.data.from_items([{"path": str(path)} for path in paths])
    model = model or TASKS[task].default_model
    # Listing opens each document for its page count only: no CPU reserved, or actors holding every
    # CPU of a small cluster would leave it waiting forever.
    rows = paths.flat_map(_page_rows, fn_kwargs=dict(task=task, model=model, pages=pages, dpi=dpi, password=password),
                          num_cpus=0)
    return _records(rows, model, task, workers, gpus, dict(prompt=prompt, batch_size=batch_size,
                                                           max_new_tokens=max_new_tokens),
                    dtype, compile, attention, pages_per_call, worker, as_schema=True)


def transcribe_on_ray(spec: EngineSpec, workers: int, task: str, items: Iterable[PageJob | ErrorJob], *, dpi: float,
                      password: str | None = None, gpus: bool | None = None, prompt: str | None = None,
                      batch_size: int | None = None, max_new_tokens: int | None = None, keep_images: bool = False,
                      pages_per_call: int | None = None, on_page: Callable[[PageResult, int, str], None] | None = None,
                      worker: Callable[..., Worker] = Worker) -> Iterator[tuple[PageJob | ErrorJob, PageResult | None]]:
    """`transcribe_on_devices` on a Ray actor pool: the same (item, result) pairs in input order, from
    ``items`` listed here with `iter_pages(..., render=False)`; ``spec.device`` is the actors' device
    type ("cuda" or "cpu"). Nothing starts when every page is done. Raises WorkersLost when the
    actors cannot load the model (``wrong_model`` when it does not fit the task)."""
    order = InputOrder()
    refs = []
    for item in items:
        if isinstance(item, PageJob) and not item.skipped:
            order.add(item, len(refs))
            refs.append({"key": len(refs), "ref": pickle.dumps(PageRef.of(item, dpi, password))})
        else:
            order.add(item)
    records = iter(()) if not refs else _records(
        ray.data.from_items(refs), spec.model, task, workers, gpus,
        dict(prompt=prompt, batch_size=batch_size, max_new_tokens=max_new_tokens, keep_images=keep_images),
        spec.dtype, spec.compile, spec.attention, pages_per_call, worker, as_schema=False).iter_rows()
    try:
        yield from order.ready()  # the items before the first page that needs the model
        for row in records:
            record = pickle.loads(row["record"])
            if isinstance(record, LoadFailure):
                raise WorkersLost(*record)
            order.finish(record.key, record.item, record.result)
            if on_page is not None and record.result is not None:
                on_page(record.result, record.new_tokens, "ray")
            yield from order.ready()
        order.check_drained()
    finally:
        close = getattr(records, "close", None)
        if close is not None:
            close()  # stops the Dataset's execution when the run ends early


def _page_rows(row: dict, task: str, model: str, pages, dpi: float, password: str | None) -> list[dict]:
    """One input file -> its page rows (a CPU task: each document opened once, for its page count)."""
    rows = []
    for item in iter_pages([Path(row["path"])], pages, dpi, password, render=False):
        if isinstance(item, PageJob):
            payload = PageRef.of(item, dpi, password)
        elif item.warning:
            continue
        else:
            payload = PageResult.failed(item.source, item.page or 0, task, model, item.error)
        rows.append({"key": 0, "ref": pickle.dumps(payload)})  # the key orders the CLI's pages only
    return rows


def _records(rows: ray.data.Dataset, model: str, task: str, workers: int, gpus: bool | None, options: dict,
             dtype: str, compile, attention: str, pages_per_call: int | None, worker, as_schema: bool) -> ray.data.Dataset:
    """Page rows through the actor pool."""
    if gpus is None:
        gpus = ray.cluster_resources().get("GPU", 0) > 0
    spec = EngineSpec(model, "cuda" if gpus else "cpu", dtype, compile, attention)
    slots = options.get("batch_size") or (64 if gpus else 4)
    # An actor runs CALLS_PER_ACTOR tasks at once, and each task several of its batches (its call is a
    # coroutine: Ray Data overlaps a task's batches, RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY,
    # 4). No task waits at an actor beyond those, or the first actor up would take the pages of all.
    pool = ray.data.ActorPoolStrategy(size=workers, max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
                                      max_tasks_in_flight_per_actor=CALLS_PER_ACTOR)
    per_call = pages_per_call or slots
    with warnings.catch_warnings():
        # Ray 2.60 takes max_restarts and max_task_retries only as `ray_remote_args` and warns that those
        # go in 2.64 (its default, retrying forever, would loop on a page that kills every actor).
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return rows.map_batches(
            _Pages, batch_size=per_call, batch_format="numpy",
            fn_constructor_kwargs=dict(spec=spec, task=task, options=options, worker=worker, as_schema=as_schema),
            compute=pool, num_gpus=1 if gpus else 0, num_cpus=1, max_restarts=RETRIES, max_task_retries=RETRIES)


class _Pages:
    """An actor: one Worker and its `_Stream`; each call is one Ray batch of page rows."""

    def __init__(self, spec: EngineSpec, task: str, options: dict, worker, as_schema: bool):
        self.task, self.model, self.as_schema = task, spec.model, as_schema
        self.failure = None
        try:
            self.stream = _Stream(worker(spec, task, **options))
        except Exception as err:
            if as_schema:
                raise  # a Ray user sees the actor's creation error
            self.failure = pickle.dumps(LoadFailure.of(err, spec.model))  # the CLI's driver says it, in one line

    async def __call__(self, batch: dict) -> dict | pyarrow.Table:
        """One Ray batch: its pages go to the actor's one continuous batch (this thread only waits)."""
        return await asyncio.to_thread(self._call, batch)

    def _call(self, batch: dict) -> dict | pyarrow.Table:
        if self.failure is not None:
            return {"key": batch["key"], "record": [self.failure] * len(batch["key"])}
        refs, out = [], {}
        for index, (key, blob) in enumerate(zip(batch["key"], batch["ref"])):
            payload = pickle.loads(blob)
            if isinstance(payload, PageRef):
                refs.append((index, payload))
            else:
                out[index] = payload.to_dict()  # an input that could not be opened (transcribe_dataset)
        for record in self.stream.run(refs):
            item, result = record.item, record.result
            if not self.as_schema:
                out[record.key] = pickle.dumps(record._replace(key=int(batch["key"][record.key])))
            elif result is not None:
                out[record.key] = result.to_dict()
            else:  # the page could not be rendered
                out[record.key] = PageResult.failed(item.source, item.page, self.task, self.model, item.error).to_dict()
        values = [out[index] for index in range(len(batch["ref"]))]
        if self.as_schema:
            return pyarrow.Table.from_pylist(values, schema=record_schema())
        return {"key": batch["key"], "record": values}


class _Stream:
    """One Worker's continuous batch, fed by every call its actor runs at once: `run` adds a call's
    pages and returns their records once they are all done; pages finish out of order, so a long page
    holds back its own call only. The batch ends (its slots drain) when it is short of pages and
    none has come for ``wait`` seconds; the next call starts another."""

    def __init__(self, worker: Worker, wait: float = FEED_WAIT, patience: float = FEED_PATIENCE):
        self.worker, self.wait, self.patience = worker, wait, patience
        self.changed = threading.Condition()
        self.queue: deque = deque()  # ((ticket, key), PageRef) not yet pulled by the batch
        self.pulled = self.finished = 0  # pages the batch took, and records it gave back
        self.done: dict[int, dict] = {}  # ticket -> {key: Record}, for each call waiting
        self.failed: dict[int, BaseException] = {}  # ticket -> what stopped the batch its pages were in
        self.tickets = itertools.count()
        self.running = False  # a thread runs the batch (or is about to end)

    def run(self, refs: list[tuple[int, PageRef]]) -> list[Record]:
        """The records of ``refs`` ((key, PageRef) pairs), keys as given, in no particular order."""
        if not refs:
            return []
        with self.changed:
            ticket = next(self.tickets)
            self.done[ticket] = {}
            self.queue.extend(((ticket, key), ref) for key, ref in refs)
            if not self.running:
                self.running = True
                threading.Thread(target=self._serve, name="kosmos-batch", daemon=True).start()
            self.changed.notify_all()
            self.changed.wait_for(lambda: len(self.done[ticket]) == len(refs) or ticket in self.failed)
            records, error = self.done.pop(ticket), self.failed.pop(ticket, None)
        if len(records) < len(refs):
            raise error
        return list(records.values())

    def _pull(self) -> Iterator[tuple[tuple[int, int], PageRef]]:
        """The batch's pages, as calls add them, until it is short of pages and none has come for
        ``wait`` seconds.

        The batch's look-ahead pulls here ahead of its slots. While at least as many pages as slots
        are out (rendering, waiting or decoding: the slots are full or pages wait behind them), the
        batch cannot be waiting for one, so this waits for the next call for as long as that lasts
        (``patience`` at most: a page that failed to render is out until the batch next yields). Once
        they are fewer, the batch may have a free slot and be waiting here, its pages in flight
        stalled: only ``wait`` seconds, then the batch drains."""
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.queue or self.pulled - self.finished < self.worker.slots,
                                      timeout=self.patience)
                if not self.changed.wait_for(lambda: self.queue, timeout=self.wait):
                    return
                page = self.queue.popleft()
                self.pulled += 1
            yield page  # not holding the lock

    def _serve(self) -> None:
        """Run batches while there are pages (in a thread of its own)."""
        while True:
            try:
                for record in self.worker.run(self._pull(), ordered=False):
                    ticket, key = record.key
                    with self.changed:
                        self.done[ticket][key] = record._replace(key=key)
                        self.finished += 1
                        self.changed.notify_all()
            except BaseException as err:  # every call still waiting gets it; the next call starts afresh
                with self.changed:
                    self.failed.update((ticket, err) for ticket in self.done)
                    self.queue.clear()
                    self.pulled = self.finished = 0
                    self.running = False
                    self.changed.notify_all()
                return
            with self.changed:
                if not self.queue:
                    self.running = False
                    return
