"""Ray: the same `Worker` on an actor pool, for a cluster (`pip install "kosmos-transcribe[ray]"`).

    input paths -> (CPU tasks) page rows -> (actor pool: one Worker an actor) records

`transcribe_dataset` is the pipeline for users who stay in Ray: it returns a Dataset of page records
in the JSONL schema. `transcribe_on_ray` is the CLI's `--ray` run: the driver lists the pages (and
skips finished ones), the actors do the model work, the driver writes every file.

A row carries a pickled `PageRef` (or, for an input that cannot be opened, its failure record), so no
column mixes types. Each actor loads its engine once and runs one continuous batch over a Ray batch
of `pages_per_call` pages; the slots drain only at the end of such a batch, so it is 16 times the
decode slots by default (Ray queues the next batch at the actor meanwhile). A dead actor is restarted and its batch retried
(`max_restarts`, `max_task_retries`): a batch's records come out once, from the attempt that finished.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

import ray

from ..documents import DEFAULT_DPI
from ..inputs import PageSelection
from ..pages import ErrorJob, InputOrder, PageJob, iter_pages
from ..results import PageResult
from ..tasks import TASKS
from .worker import EngineSpec, PageRef, Worker

__all__ = ["RETRIES", "transcribe_dataset", "transcribe_on_ray"]

RETRIES = 3  # restarts of a dead actor, and retries of the batch it had


def transcribe_dataset(paths: Iterable[str | Path] | ray.data.Dataset, task: str, *, model: str | None = None,
                       workers: int = 1, gpus: bool | None = None, pages: PageSelection | None = None,
                       dpi: float = DEFAULT_DPI, password: str | None = None, prompt: str | None = None,
                       batch_size: int | None = None, max_new_tokens: int | None = None, dtype: str = "auto",
                       compile: bool | str = "auto", attention: str = "auto", pages_per_call: int | None = None,
                       worker: Callable[..., Worker] = Worker) -> ray.data.Dataset:
    """A lazy Dataset of page records (`PageResult.to_dict()`, one row a page) for ``task`` (ocr, md,
    ground) over ``paths``: file paths the actors can read, or a Dataset with a ``path`` column.

    A document that cannot be opened is one row with ``error`` (page 0). ``workers`` actors, each on
    one GPU when ``gpus`` (default: when the cluster has GPUs), else on one CPU; the other options
    are the command's. Write it with ``.write_parquet(...)`` or ``.write_json(...)``."""
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
    type ("cuda" or "cpu"). Nothing starts when every page is done."""
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
    yield from order.ready()  # the items before the first page that needs the model
    for row in records:
        record = pickle.loads(row["record"])
        order.finish(record.key, record.item, record.result)
        if on_page is not None and record.result is not None:
            on_page(record.result, record.new_tokens, "ray")
        yield from order.ready()


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
    with warnings.catch_warnings():
        # Ray 2.60 takes max_restarts and max_task_retries only as `ray_remote_args` and warns that those
        # go in 2.64 (its default, retrying forever, would loop on a page that kills every actor).
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return rows.map_batches(
            _Pages, batch_size=pages_per_call or 16 * slots, batch_format="numpy",
            fn_constructor_kwargs=dict(spec=spec, task=task, options=options, worker=worker, as_schema=as_schema),
            compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=1 if gpus else 0, num_cpus=1,
            max_restarts=RETRIES, max_task_retries=RETRIES)


class _Pages:
    """An actor: one Worker, and a continuous batch over each Ray batch of page rows."""

    def __init__(self, spec: EngineSpec, task: str, options: dict, worker, as_schema: bool):
        self.worker = worker(spec, task, **options)
        self.task, self.model, self.as_schema = task, spec.model, as_schema

    def __call__(self, batch: dict) -> dict:
        refs, failed = [], {}
        for index, (key, blob) in enumerate(zip(batch["key"], batch["ref"])):
            payload = pickle.loads(blob)
            if isinstance(payload, PageRef):
                refs.append(((index, int(key)), payload))
            else:
                failed[index] = payload
        out: dict[int, object] = {index: result.to_dict() for index, result in failed.items()}
        for record in self.worker.run(refs):
            (index, key), item = record.key, record.item
            if not self.as_schema:
                out[index] = pickle.dumps(record._replace(key=key))
            elif record.result is not None:
                out[index] = record.result.to_dict()
            else:  # the page could not be rendered
                out[index] = PageResult.failed(item.source, item.page, self.task, self.model, item.error).to_dict()
        values = [out[index] for index in range(len(batch["ref"]))]
        if self.as_schema:
            import pyarrow

            return pyarrow.Table.from_pylist(values)
        return {"key": batch["key"], "record": values}
