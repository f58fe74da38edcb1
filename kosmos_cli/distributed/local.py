"""Several devices of one machine: one worker process a device, pages handed out as workers ask.

    iter_pages(..., render=False) -> transcribe_on_devices(specs, ...) -> (item, PageResult), in input order

The parent only lists pages (each document opened for its page count and the resume check) and sends
page references; each worker process (`worker.Worker`) renders, prepares and decodes. Messages, one
pipe a worker (no lock shared between processes, so a killed worker cannot block the others):

    worker -> parent   ("ready", description)  engine loaded
                       ("failed", LoadFailure)  engine not loaded; the worker exits
                       ("want",)               its look-ahead has room: send one more page
                       ("done", Record)        a page finished (records come in the order sent)
    parent -> worker   (key, PageRef)          one page; to an idle worker it starts a run
                       None                    no more pages for this run: finish those in flight
                       "stop"                  exit (to an idle worker)

Hand-out is dynamic: a running worker asks for a page whenever its batch slots and look-ahead have
room, so a worker on long pages takes fewer. A worker that dies (killed, crashed, CUDA error) has its
pages in flight requeued as suspects; a suspect runs alone on a worker (one drained for it), so a
page that takes down a second worker is the culprit and becomes an error record. Workers ignore
SIGINT: the parent stops them on Ctrl-C (or on any early end), and each exits if the parent is gone.
"""

from __future__ import annotations

import itertools
import signal
import threading
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Callable, Iterable, Iterator

from ..pages import ErrorJob, InputOrder, PageJob
from ..report import library_output_held
from ..results import PageResult
from .processes import (CRASHED_TWICE, NO_WORKER, WorkerProcess, WorkersLost, exit_with_parent, labels, reap,
                        received, send, spawn)
from .worker import EngineSpec, LoadFailure, PageRef, Worker

__all__ = ["transcribe_on_devices"]



def transcribe_on_devices(
    specs: list[EngineSpec],
    task: str,
    items: Iterable[PageJob | ErrorJob],
    *,
    dpi: float,
    password: str | None = None,
    prompt: str | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    keep_images: bool = False,
    on_page: Callable[[PageResult, int, str], None] | None = None,
    log: Callable[[str], None] | None = None,
    worker: Callable[..., Worker] = Worker,
) -> Iterator[tuple[PageJob | ErrorJob, PageResult | None]]:
    """`pipeline.transcribe` on one worker process per spec: the same (item, result) pairs in input
    order, from ``items`` listed with `iter_pages(..., render=False)`.

    Workers start once a page needs the model (a run whose pages are all done starts none).
    ``worker`` builds the Worker in each process (picklable; tests pass a subclass that crashes).
    ``on_page(result, new_tokens, label)`` is called as each page arrives, ``label`` naming its
    worker's device; ``log`` gets the workers' start and loss. Raises WorkersLost when no worker is
    left with pages to do: the pairs before the first missing page have come out."""
    listing = iter(items)
    for first in listing:
        if isinstance(first, PageJob) and not first.skipped:
            break
        yield first, None
    else:
        return
    driver = _Driver(specs, task, dict(prompt=prompt, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                       keep_images=keep_images), worker, log or (lambda message: None))
    driver.start()
    finished = False
    try:
        yield from driver.run(first, listing, dpi, password, on_page)
        finished = True
    finally:
        driver.stop(politely=finished)


class _Driver:
    def __init__(self, specs, task, options, worker, log):
        self.specs, self.labels, self.task, self.options, self.worker, self.log = (
            specs, labels(specs), task, options, worker, log)
        self.slots: list[WorkerProcess] = []

    def start(self) -> None:
        self.slots = spawn(self.specs, self.labels, _serve, lambda spec: (self.worker, spec, self.task, self.options))

    def stop(self, politely: bool) -> None:
        """End every worker process; none is left behind (after a Ctrl-C too)."""
        for slot in self.slots:
            if politely and slot.state == "idle":
                send(slot, "stop")
            elif slot.process.is_alive():
                slot.process.terminate()
        reap(self.slots, 5 if politely else 2)

    def run(self, first: PageJob, listing: Iterator, dpi: float, password: str | None, on_page):
        order = InputOrder()
        suspects: deque[int] = deque()  # keys of pages a dead worker had in flight
        crashes: dict[int, int] = {}
        jobs: dict[int, PageJob] = {}  # key -> the page job, until its record is in
        pending = [first]
        keys = itertools.count()
        exhausted = False
        failures: list[LoadFailure] = []  # why workers could not load their engine

        def fresh() -> int | None:
            """The next page of the listing for a worker (items that need none join the order)."""
            nonlocal exhausted
            while not exhausted:
                item = pending.pop() if pending else next(listing, None)
                if item is None:
                    exhausted = True
                elif isinstance(item, PageJob) and not item.skipped:
                    key = next(keys)
                    jobs[key] = item
                    order.add(item, key)
                    return key
                else:
                    order.add(item)
            return None

        def hand(slot: WorkerProcess, key: int) -> None:
            slot.inflight[key] = jobs[key]
            send(slot, (key, PageRef.of(jobs[key], dpi, password)))

        def end_run(slot: WorkerProcess) -> None:
            send(slot, None)
            slot.state = "idle"

        def give_up(key: int, why: str) -> None:
            """The page of ``key`` comes out as a failure, ``why``, in its turn."""
            job = jobs.pop(key)
            order.finish(key, job, PageResult.failed(job.source, job.page, self.task, self.specs[0].model, why))

        def lost(slot: WorkerProcess, why: str) -> None:
            slot.state = "dead"
            requeued = 0
            for key in slot.inflight:
                crashes[key] = crashes.get(key, 0) + 1
                if crashes[key] >= 2:
                    give_up(key, CRASHED_TWICE)
                else:
                    suspects.append(key)
                    requeued += 1
            slot.inflight.clear()
            self.log(f"worker {slot.label} {why}" + (f"; its {requeued} pages in flight go to the others" if requeued else ""))

        while True:
            yield from order.ready()
            for slot in self.slots:  # idle workers with nothing in flight: start a run
                if slot.state == "idle" and not slot.inflight:
                    key = suspects.popleft() if suspects else fresh()
                    if key is not None:
                        slot.state, slot.solo = "running", key in crashes
                        hand(slot, key)
            if exhausted and not order:
                return
            live = [slot for slot in self.slots if slot.state != "dead"]
            if not live and failures and all(slot.pages == 0 for slot in self.slots):
                raise WorkersLost(*failures[0])
            if not live:
                # The pages done so far come out (in order, those not done as failures), then the run stops.
                for key in sorted(jobs):
                    give_up(key, NO_WORKER)
                yield from order.ready()
                raise WorkersLost("every worker stopped before the run was done (the pages done are saved; "
                                  "a re-run with -o continues)")
            ready = wait([slot.conn for slot in live] + [slot.process.sentinel for slot in live])
            for slot in live:
                if slot.conn not in ready and slot.process.sentinel not in ready:
                    continue
                for message in received(slot):
                    kind = message[0]
                    if kind == "ready":
                        slot.state = "idle"
                        self.log(f"running {message[1]}")
                    elif kind == "failed":
                        slot.state = "dead"
                        failures.append(message[1])
                        self.log(f"worker {slot.label}: {message[1].message}")
                    elif kind == "want":
                        key = None if slot.solo or suspects else fresh()
                        if key is None:
                            end_run(slot)
                        else:
                            hand(slot, key)
                    else:  # "done"
                        record = message[1]
                        del slot.inflight[record.key], jobs[record.key]
                        slot.solo = slot.solo and bool(slot.inflight)
                        slot.pages += 1
                        order.finish(record.key, record.item, record.result)
                        if on_page is not None and record.result is not None:
                            on_page(record.result, record.new_tokens, slot.label)
                if slot.state != "dead" and not slot.process.is_alive():
                    slot.process.join()
                    lost(slot, f"stopped (exit code {slot.process.exitcode})")


# ------------------------------------------------------------------------------------------------
# In the worker process
# ------------------------------------------------------------------------------------------------


def _serve(conn: Connection, parent: int, threads: int, make_worker, spec: EngineSpec, task: str, options: dict) -> None:
    """A worker process: load the engine, then run page after page as the parent hands them out. The
    process is ours, as the command's is: the libraries' output stays off its stderr, which is the
    parent's (what matters of it the parent says: a page's notes come back in its record, a
    document's come from the parent's own listing)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    threading.Thread(target=exit_with_parent, args=(parent,), daemon=True).start()
    with library_output_held():
        _serve_pages(conn, threads, make_worker, spec, task, options)


def _serve_pages(conn: Connection, threads: int, make_worker, spec: EngineSpec, task: str, options: dict) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        worker = make_worker(spec, task, **options)
    except Exception as err:  # the parent reports it; the traceback would say no more to a user
        conn.send(("failed", LoadFailure.of(err, spec.model)))
        return
    conn.send(("ready", str(worker.engine)))
    lock = threading.Lock()  # the look-ahead's thread asks for pages while this one sends records

    def send(message) -> None:
        with lock:
            conn.send(message)

    def refs(first) -> Iterator:
        yield first
        while True:
            send(("want",))
            message = conn.recv()
            if message is None:
                return
            yield message

    while (first := conn.recv()) != "stop":
        for record in worker.run(refs(first)):
            send(("done", record))


