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

A server's workers (`WorkerPool`) never end a run: each keeps one open stream (`pipeline.PageStream`)
and takes pages while its rows run, each page with its own task, prompt and budget (`PageRef`):

    worker -> parent   ("ready", description, slots)  engine loaded and warmed up
                       ("failed", LoadFailure)
                       ("done", key, PageResult)      a page finished (as each is done)
    parent -> worker   (key, PageRef)                 one more page
                       ("cancel", key)                drop it: queued, or running (slot freed)
                       "stop"                         finish the pages held, then exit

Hand-out is dynamic: a running worker asks for a page whenever its batch slots and look-ahead have
room, so a worker on long pages takes fewer. A worker that dies (killed, crashed, CUDA error) has its
pages in flight requeued as suspects; a suspect runs alone on a worker (one drained for it), so a
page that takes down a second worker is the culprit and becomes an error record. Workers ignore
SIGINT: the parent stops them on Ctrl-C (or on any early end), and each exits if the parent is gone.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from multiprocessing.connection import Connection, wait
from typing import Callable, Iterable, Iterator

from ..pages import ErrorJob, InputOrder, PageJob
from ..report import library_output_held
from ..results import PageResult
from .worker import EngineSpec, LoadFailure, Opener, PageRef, Worker

__all__ = ["WorkerPool", "WorkersLost", "transcribe_on_devices"]

_WARM_UP = "warm-up"  # the key of a serving worker's first page, its own
CRASHED_TWICE = "the page stopped two workers (killed, crashed or out of memory): skipped"
NO_WORKER = "not done: every worker stopped"


class WorkersLost(RuntimeError):
    """Every worker is gone (none could load the model, or all died): the run cannot go on.
    ``wrong_model``: they could not, because the model does not fit the task (a usage error)."""

    def __init__(self, message: str, wrong_model: bool = False):
        super().__init__(message)
        self.wrong_model = wrong_model


@dataclass(eq=False)
class _Slot:
    """One worker process as the parent sees it."""

    label: str
    process: multiprocessing.process.BaseProcess
    conn: Connection
    state: str = "starting"  # starting -> idle <-> running; dead
    inflight: dict = field(default_factory=dict)  # key -> PageJob sent and not done
    solo: bool = False  # running one suspect page alone
    pages: int = 0
    capacity: int = 1  # a serving worker's decode slots


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
        labels = _labels(specs)
        self.specs, self.labels, self.task, self.options, self.worker, self.log = specs, labels, task, options, worker, log
        self.slots: list[_Slot] = []

    def start(self) -> None:
        self.slots = _spawn(self.specs, self.labels, _serve, lambda spec: (self.worker, spec, self.task, self.options))

    def stop(self, politely: bool) -> None:
        """End every worker process; none is left behind (after a Ctrl-C too)."""
        for slot in self.slots:
            if politely and slot.state == "idle":
                _send(slot, "stop")
            elif slot.process.is_alive():
                slot.process.terminate()
        _reap(self.slots, 5 if politely else 2)

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

        def hand(slot: _Slot, key: int) -> None:
            slot.inflight[key] = jobs[key]
            _send(slot, (key, PageRef.of(jobs[key], dpi, password)))

        def end_run(slot: _Slot) -> None:
            _send(slot, None)
            slot.state = "idle"

        def give_up(key: int, why: str) -> None:
            """The page of ``key`` comes out as a failure, ``why``, in its turn."""
            job = jobs.pop(key)
            order.finish(key, job, PageResult.failed(job.source, job.page, self.task, self.specs[0].model, why))

        def lost(slot: _Slot, why: str) -> None:
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
                while slot.state != "dead":
                    try:
                        if not slot.conn.poll():
                            break
                        message = slot.conn.recv()
                    except (EOFError, OSError):
                        break
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


class WorkerPool:
    """Worker processes, one a device, serving a server's pages as they come: the server's side of
    the driver (`transcribe_on_devices` is the command's). Each worker keeps an open stream and takes
    pages while its rows run, each with its own task, prompt and budget (see the module docstring).

    Starting waits until every worker has loaded its model and decoded a warm-up page, and raises
    WorkersLost if none could. `put(key, ref)` (any thread) sends a page to the live worker with the
    fewest pages in flight for its slots; ``deliver(key, result)`` hears each page's record,
    from the pool's thread; `cancel(key)` drops a page wherever it is. A worker that dies has its
    pages sent to the others once (a page in flight when a second worker dies fails,
    CRASHED_TWICE); with no worker left, pages fail at once (NO_WORKER). `close` lets the workers
    finish the pages they hold and ends them."""

    def __init__(self, specs: list[EngineSpec], *, slots: int | None, max_prompt_tokens: int, max_new_tokens: int,
                 deliver: Callable[[object, PageResult], None], log: Callable[[str], None]):
        self.model, self.deliver, self.log = specs[0].model, deliver, log
        self.workers = _spawn(specs, _labels(specs), _serve_stream,
                              lambda spec: (spec, slots, max_prompt_tokens, max_new_tokens))
        self._lock = threading.Lock()  # the workers' states and pages in flight, and sending to them
        self._crashes: dict = {}  # key -> workers it was in flight on when they died
        self._closing = False
        failures = [failure for slot in self.workers if (failure := self._await_ready(slot)) is not None]
        if all(slot.state == "dead" for slot in self.workers):
            _reap(self.workers, 2)
            raise WorkersLost(*failures[0]) if failures else WorkersLost("every worker stopped while loading the model")
        self.slots = sum(slot.capacity for slot in self.workers if slot.state != "dead")
        self._listener = threading.Thread(target=self._listen, name="kosmos-workers", daemon=True)
        self._listener.start()

    def _await_ready(self, slot: _Slot) -> LoadFailure | None:
        while True:
            wait([slot.conn, slot.process.sentinel])
            try:
                message = slot.conn.recv()
            except (EOFError, OSError):
                slot.state = "dead"
                self.log(f"worker {slot.label} stopped while loading (exit code {slot.process.exitcode})")
                return None
            if message[0] == "ready":
                slot.state, slot.capacity = "running", message[2]
                self.log(f"running {message[1]}")
                return None
            slot.state = "dead"
            self.log(f"worker {slot.label}: {message[1].message}")
            return message[1]

    def put(self, key, ref: PageRef) -> None:
        with self._lock:
            live = [slot for slot in self.workers if slot.state != "dead"]
            if live:
                slot = min(live, key=lambda s: len(s.inflight) / s.capacity)
                slot.inflight[key] = ref
                _send(slot, (key, ref))
                return
        self._fail(key, ref, NO_WORKER)

    def cancel(self, key) -> None:
        with self._lock:
            for slot in self.workers:
                if slot.inflight.pop(key, None) is not None:
                    _send(slot, ("cancel", key))

    def __len__(self) -> int:
        """Pages sent to workers beyond their free slots (waiting there for one)."""
        with self._lock:
            return sum(max(0, len(slot.inflight) - slot.capacity) for slot in self.workers if slot.state != "dead")

    def close(self, timeout: float | None = None) -> None:
        """The workers finish the pages they hold, then exit (killed after ``timeout`` seconds)."""
        with self._lock:
            self._closing = True
            for slot in self.workers:
                if slot.state != "dead":
                    _send(slot, "stop")
        self._listener.join(timeout)
        _reap(self.workers, 2)

    def _fail(self, key, ref: PageRef, why: str) -> None:
        self.deliver(key, PageResult.failed(ref.source, ref.page, ref.task, self.model, why))

    def _listen(self) -> None:
        """Records in, dead workers noticed: until every worker has ended."""
        while live := [slot for slot in self.workers if slot.state != "dead"]:
            wait([slot.conn for slot in live] + [slot.process.sentinel for slot in live], timeout=1)
            for slot in live:
                while True:
                    try:
                        if not slot.conn.poll():
                            break
                        _, key, result = slot.conn.recv()
                    except (EOFError, OSError):
                        break
                    with self._lock:
                        wanted = slot.inflight.pop(key, None) is not None  # not cancelled meanwhile
                    if wanted:
                        slot.pages += 1
                        self.deliver(key, result)
                if not slot.process.is_alive():
                    self._lost(slot)

    def _lost(self, slot: _Slot) -> None:
        slot.process.join()
        with self._lock:
            slot.state = "dead"
            orphans, slot.inflight = slot.inflight, {}
            if self._closing and not orphans:
                return
        self.log(f"worker {slot.label} stopped (exit code {slot.process.exitcode})"
                 + (f"; its {len(orphans)} pages in flight go to the others" if orphans else ""))
        for key, ref in orphans.items():
            self._crashes[key] = self._crashes.get(key, 0) + 1
            if self._crashes[key] >= 2 or self._closing:
                self._fail(key, ref, CRASHED_TWICE if not self._closing else NO_WORKER)
            else:
                self.put(key, ref)


def _labels(specs: list[EngineSpec]) -> list[str]:
    """Each worker's name in messages: its device, numbered where a device has several."""
    devices = [spec.device for spec in specs]
    return [device if devices.count(device) == 1 else f"{device}#{k}" for k, device in enumerate(devices)]


def _spawn(specs: list[EngineSpec], labels: list[str], target, arguments) -> list[_Slot]:
    """One process a spec running ``target(conn, parent pid, threads, *arguments(spec))``, the cores
    shared among them."""
    context = multiprocessing.get_context("spawn")  # torch and fork do not mix
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // len(specs))
    # Children inherit an ignored SIGINT through exec and Python keeps it ignored: a Ctrl-C while a
    # worker imports torch must not kill it with a traceback; the parent stops the workers.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    slots = []
    try:
        for spec, label in zip(specs, labels):
            ours, theirs = context.Pipe()
            process = context.Process(target=target, name=f"kosmos-worker-{label}", daemon=True,
                                      args=(theirs, os.getpid(), threads, *arguments(spec)))
            process.start()
            theirs.close()
            slots.append(_Slot(label, process, ours))
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    return slots


def _reap(slots: list[_Slot], seconds: float) -> None:
    """Wait ``seconds`` for each process to end, then kill it."""
    for slot in slots:
        slot.process.join(seconds)
        if slot.process.is_alive():
            slot.process.kill()
            slot.process.join()
        slot.conn.close()


def _send(slot: _Slot, message) -> None:
    try:
        slot.conn.send(message)
    except (BrokenPipeError, OSError):  # it died: its sentinel says so next
        pass


# ------------------------------------------------------------------------------------------------
# In the worker process
# ------------------------------------------------------------------------------------------------


def _serve(conn: Connection, parent: int, threads: int, make_worker, spec: EngineSpec, task: str, options: dict) -> None:
    """A worker process: load the engine, then run page after page as the parent hands them out. The
    process is ours, as the command's is: the libraries' output stays off its stderr, which is the
    parent's (what matters of it the parent says: a page's notes come back in its record, a
    document's come from the parent's own listing)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
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


def _serve_stream(conn: Connection, parent: int, threads: int, spec: EngineSpec, slots: int | None,
                  max_prompt_tokens: int, max_new_tokens: int) -> None:
    """A server's worker process: load the engine, warm it up, then decode the pages the parent sends
    in one open stream, the stream in this (the main) thread and the messages in another."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    with library_output_held():
        _stream_pages(conn, threads, spec, slots, max_prompt_tokens, max_new_tokens)


def _stream_pages(conn: Connection, threads: int, spec: EngineSpec, slots: int | None, max_prompt_tokens: int,
                  max_new_tokens: int) -> None:
    import torch
    from PIL import Image

    from ..pipeline import PageStream, slots_for
    from ..tasks import TASKS, tasks_for

    torch.set_num_threads(threads)
    try:
        engine = spec.load()
    except Exception as err:
        conn.send(("failed", LoadFailure.of(err, spec.model)))
        return
    lock = threading.Lock()  # records go out from the stream's thread, failures from the receiver's

    def send(message) -> None:
        with lock:
            conn.send(message)

    task = tasks_for(engine.kind)[0]
    slots = slots_for(engine, task, None, slots, max_new_tokens)

    def deliver(key, result) -> None:
        send(("ready", str(engine), slots) if key is _WARM_UP else ("done", key, result))

    stream = PageStream(engine, slots=slots, max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                        deliver=deliver)
    stream.put(_WARM_UP, PageJob(Path("warm-up"), "warm-up", 1, 1, (1,), image=Image.new("RGB", (64, 64), "white")),
               task, task.prompt, 4)

    def receive() -> None:
        opener = Opener()
        try:
            while (message := conn.recv()) != "stop":
                if message[0] == "cancel":
                    stream.cancel(message[1])
                    continue
                key, ref = message
                page = opener.job(ref)
                if isinstance(page, ErrorJob):  # the document cannot be opened (gone since it was listed)
                    deliver(key, PageResult.failed(ref.source, ref.page, ref.task, spec.model, page.error))
                else:
                    stream.put(key, page, TASKS[ref.task], ref.prompt, ref.max_new_tokens)
        except (EOFError, OSError):  # the parent is gone
            pass
        finally:
            opener.close()
            stream.close()

    threading.Thread(target=receive, name="kosmos-receiver", daemon=True).start()
    stream.run()


def _exit_with(parent: int) -> None:
    """Leave when the parent is gone (killed before it could stop us): no orphan keeps a GPU busy."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)
