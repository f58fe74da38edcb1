"""A server's worker processes, one a device: the serving side of the multi-device driver (`local`
is the command's), on the same processes (`processes`).

Workers never end a run: each keeps one open stream (`pipeline.PageStream`) and takes pages while its
rows run, each page with its own task, prompt and budget (`PageRef`). Messages, one pipe a worker:

    worker -> parent   ("ready", description, slots)  engine loaded and warmed up
                       ("failed", LoadFailure)        engine not loaded; the worker exits
                       ("done", key, PageResult)      a page finished (as each is done)
    parent -> worker   (key, PageRef)                 one more page
                       ("cancel", key)                drop it: queued, or running (slot freed)
                       "stop"                         finish the pages held, then exit
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Callable

from ..pages import ErrorJob, PageJob
from ..report import library_output_held
from ..results import PageResult
from .processes import (CRASHED_TWICE, NO_WORKER, WorkerProcess, WorkersLost, exit_with_parent, labels, reap,
                        received, send, spawn)
from .worker import EngineSpec, LoadFailure, Opener, PageRef

__all__ = ["WorkerPool"]

_WARM_UP = "warm-up"  # the key of a serving worker's first page, its own
RESTARTS = 3  # times a device's worker is started again within RESTART_WINDOW seconds; then it stays dead
RESTART_WINDOW = 600.0


class WorkerPool:
    """Worker processes, one a device, serving a server's pages as they come: the server's side of
    the driver (`transcribe_on_devices` is the command's). Each worker keeps an open stream and takes
    pages while its rows run, each with its own task, prompt and budget (see the module docstring).

    Starting waits until every worker has loaded its model and decoded a warm-up page, and raises
    WorkersLost if none could. `put(key, ref)` (any thread) sends a page to the ready worker with the
    fewest pages in flight for its slots (or keeps it until one is ready); ``deliver(key, result)``
    hears each page's record, from the pool's thread; `cancel(key)` drops a page wherever it is.

    A worker that dies is started again (at most RESTARTS times in RESTART_WINDOW seconds a device),
    and the pages it had in flight become suspects: as in the command's driver, each runs alone on a
    worker with nothing else in flight, so a page that takes down a second worker is the culprit
    (CRASHED_TWICE) and the pages beside it are not. With no worker left or starting, pages fail at
    once (NO_WORKER). `close` lets the workers finish the pages they hold and ends them."""

    def __init__(self, specs: list[EngineSpec], *, slots: int | None, max_prompt_tokens: int, max_new_tokens: int,
                 deliver: Callable[[object, PageResult], None], log: Callable[[str], None]):
        self.model, self.deliver, self.log = specs[0].model, deliver, log
        names = labels(specs)
        self._specs = dict(zip(names, specs))
        self._spawn = lambda device_specs, device_names: spawn(
            device_specs, device_names, _serve_stream, lambda spec: (spec, slots, max_prompt_tokens, max_new_tokens))
        self.workers = self._spawn(specs, names)
        # Under the lock: the workers' states and pages in flight, sending to them, and:
        self._lock = threading.Lock()
        self._pending: deque[tuple] = deque()  # (key, ref) waiting for a ready worker
        self._suspects: deque[tuple] = deque()  # (key, ref) in flight on a worker that died: each to run alone
        self._solo: WorkerProcess | None = None  # the worker kept for the suspects, one at a time
        self._crashes: dict = {}  # key -> workers it was in flight on when they died
        self._restarts: dict[str, list[float]] = {}  # device -> when it was last started again
        self._closing = False
        failures = [failure for slot in self.workers if (failure := self._await_ready(slot)) is not None]
        if all(slot.state == "dead" for slot in self.workers):
            reap(self.workers, 2)
            raise WorkersLost(*failures[0]) if failures else WorkersLost("every worker stopped while loading the model")
        self._listener = threading.Thread(target=self._listen, name="kosmos-workers", daemon=True)
        self._listener.start()

    def _await_ready(self, slot: WorkerProcess) -> LoadFailure | None:
        while slot.state == "starting":
            wait([slot.conn, slot.process.sentinel])
            try:
                message = slot.conn.recv()
            except (EOFError, OSError):
                slot.state = "dead"
                self.log(f"worker {slot.label} stopped while loading (exit code {slot.process.exitcode})")
                return None
            failure = self._started(slot, message)
            if failure is not None:
                return failure
        return None

    def _started(self, slot: WorkerProcess, message) -> LoadFailure | None:
        """A starting worker's first message: ready (running from now on), or why it is not."""
        if message[0] == "ready":
            slot.state, slot.capacity = "running", message[2]
            self.log(f"running {message[1]}")
            return None
        slot.state = "dead"
        self.log(f"worker {slot.label}: {message[1].message}")
        return message[1]

    @property
    def slots(self) -> int:
        """The ready workers' decode slots."""
        with self._lock:
            return sum(slot.capacity for slot in self.workers if slot.state == "running")

    def put(self, key, ref: PageRef) -> None:
        with self._lock:
            self._pending.append((key, ref))
            failed = self._dispatch()
        self._fail(failed, NO_WORKER)

    def cancel(self, key) -> None:
        with self._lock:
            for slot in self.workers:
                if slot.inflight.pop(key, None) is not None:
                    send(slot, ("cancel", key))
            self._pending = deque(page for page in self._pending if page[0] != key)
            self._suspects = deque(page for page in self._suspects if page[0] != key)

    def __len__(self) -> int:
        """Pages waiting for a slot: here, or sent to workers beyond their slots."""
        with self._lock:
            sent = sum(max(0, len(slot.inflight) - slot.capacity) for slot in self.workers if slot.state == "running")
            return len(self._pending) + len(self._suspects) + sent

    def close(self, timeout: float | None = None) -> None:
        """The workers finish the pages they hold, then exit (killed after ``timeout`` seconds)."""
        with self._lock:
            self._closing = True
            for slot in self.workers:
                if slot.state != "dead":
                    send(slot, "stop")
        self._listener.join(timeout)
        reap(self.workers, 2)

    def _dispatch(self) -> list[tuple]:
        """Send what can go now (under the lock): the next suspect to the worker kept for them once
        it has nothing else in flight, and the pages waiting to the other ready workers. Returns the
        pages that no worker will take (none ready or starting)."""
        ready = [slot for slot in self.workers if slot.state == "running"]
        if not ready and all(slot.state == "dead" for slot in self.workers):
            return self._take_waiting()
        if self._solo is not None and (self._solo.state != "running" or not (self._suspects or self._solo.inflight)):
            self._solo = None
        if self._suspects and self._solo is None and ready:
            self._solo = min(ready, key=lambda slot: len(slot.inflight))
        if self._solo is not None and self._suspects and not self._solo.inflight:
            self._send(self._solo, *self._suspects.popleft())
        others = [slot for slot in ready if slot is not self._solo]
        while self._pending and others:
            self._send(min(others, key=lambda slot: len(slot.inflight) / slot.capacity), *self._pending.popleft())
        return []

    def _take_waiting(self) -> list[tuple]:
        """Every page waiting here (suspects and pending), taken away (under the lock)."""
        waiting = [*self._suspects, *self._pending]
        self._suspects.clear()
        self._pending.clear()
        return waiting

    def _send(self, slot: WorkerProcess, key, ref: PageRef) -> None:
        slot.inflight[key] = ref
        send(slot, (key, ref))

    def _fail(self, pages: list[tuple], why: str) -> None:
        for key, ref in pages:
            self.deliver(key, PageResult.failed(ref.source, ref.page, ref.task, self.model, why))

    def _listen(self) -> None:
        """Workers ready, records in, dead workers noticed: until every worker has ended."""
        while live := [slot for slot in self.workers if slot.state != "dead"]:
            wait([slot.conn for slot in live] + [slot.process.sentinel for slot in live], timeout=1)
            for slot in live:
                for message in received(slot):
                    done = None
                    with self._lock:
                        if slot.state == "starting":
                            self._started(slot, message)
                        else:
                            _, key, result = message
                            if slot.inflight.pop(key, None) is not None:  # not cancelled meanwhile
                                slot.pages += 1
                                self._crashes.pop(key, None)
                                done = key, result
                        failed = self._dispatch()
                    if done is not None:
                        self.deliver(*done)
                    self._fail(failed, NO_WORKER)
                if slot.state != "dead" and not slot.process.is_alive():
                    self._lost(slot)
        with self._lock:
            failed = self._take_waiting()
        self._fail(failed, NO_WORKER)

    def _lost(self, slot: WorkerProcess) -> None:
        slot.process.join()
        with self._lock:
            slot.state = "dead"
            orphans, slot.inflight = slot.inflight, {}
            culprits = []
            for key, ref in orphans.items():
                self._crashes[key] = self._crashes.get(key, 0) + 1
                (culprits if self._crashes[key] >= 2 or self._closing else self._suspects).append((key, ref))
            again = not self._closing and self._may_restart(slot.label)
            if again:
                self.workers += self._spawn([self._specs[slot.label]], [slot.label])
            failed = self._dispatch()
        if self._closing and not orphans:
            return
        self.log(f"worker {slot.label} stopped (exit code {slot.process.exitcode})"
                 + (f"; its {len(orphans) - len(culprits)} pages in flight run again, each alone"
                    if len(orphans) > len(culprits) else "")
                 + ("; starting it again" if again else ""))
        self._fail(culprits, NO_WORKER if self._closing else CRASHED_TWICE)
        self._fail(failed, NO_WORKER)

    def _may_restart(self, device: str) -> bool:
        now = time.monotonic()
        recent = [t for t in self._restarts.get(device, []) if now - t < RESTART_WINDOW]
        self._restarts[device] = recent + [now] * (len(recent) < RESTARTS)
        return len(recent) < RESTARTS


# ------------------------------------------------------------------------------------------------
# In the worker process
# ------------------------------------------------------------------------------------------------


def _serve_stream(conn: Connection, parent: int, threads: int, spec: EngineSpec, slots: int | None,
                  max_prompt_tokens: int, max_new_tokens: int) -> None:
    """A server's worker process: load the engine, warm it up, then decode the pages the parent sends
    in one open stream, the stream in this (the main) thread and the messages in another."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=exit_with_parent, args=(parent,), daemon=True).start()
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
