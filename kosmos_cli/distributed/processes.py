"""Worker processes of one machine, as both of its drivers use them (`local`, the command's; `pool`,
a server's): started with the spawn method, one pipe each (no lock shared between processes, so a
killed worker cannot block the others), the cores shared among them, SIGINT ignored (the parent stops
them on Ctrl-C), messages that never raise for a worker that died (its sentinel says so), and ended
without leaving one behind; in the worker, a watch that ends it when the parent is gone."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Iterator

from .worker import EngineSpec

__all__ = ["CRASHED_TWICE", "NO_WORKER", "WorkerProcess", "WorkersLost", "exit_with_parent", "labels", "reap", "received",
           "send", "spawn"]

CRASHED_TWICE = "the page stopped two workers (killed, crashed or out of memory): skipped"
NO_WORKER = "not done: every worker stopped"


class WorkersLost(RuntimeError):
    """Every worker is gone (none could load the model, or all died): the run cannot go on.
    ``wrong_model``: they could not, because the model does not fit the task (a usage error)."""

    def __init__(self, message: str, wrong_model: bool = False):
        super().__init__(message)
        self.wrong_model = wrong_model


@dataclass(eq=False)
class WorkerProcess:
    """One worker process as the parent sees it."""

    label: str
    process: multiprocessing.process.BaseProcess
    conn: Connection
    state: str = "starting"  # starting -> idle <-> running; dead
    inflight: dict = field(default_factory=dict)  # key -> the page sent and not done
    solo: bool = False  # running one suspect page alone
    pages: int = 0
    capacity: int = 1  # a serving worker's decode slots


def labels(specs: list[EngineSpec]) -> list[str]:
    """Each worker's name in messages: its device, numbered where a device has several."""
    devices = [spec.device for spec in specs]
    return [device if devices.count(device) == 1 else f"{device}#{k}" for k, device in enumerate(devices)]


def spawn(specs: list[EngineSpec], names: list[str], target, arguments) -> list[WorkerProcess]:
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
        for spec, label in zip(specs, names):
            ours, theirs = context.Pipe()
            process = context.Process(target=target, name=f"kosmos-worker-{label}", daemon=True,
                                      args=(theirs, os.getpid(), threads, *arguments(spec)))
            process.start()
            theirs.close()
            slots.append(WorkerProcess(label, process, ours))
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    return slots


def reap(slots: list[WorkerProcess], seconds: float) -> None:
    """Wait ``seconds`` for each process to end, then kill it."""
    for slot in slots:
        slot.process.join(seconds)
        if slot.process.is_alive():
            slot.process.kill()
            slot.process.join()
        slot.conn.close()


def send(slot: WorkerProcess, message) -> None:
    try:
        slot.conn.send(message)
    except (BrokenPipeError, OSError):  # it died: its sentinel says so next
        pass


def received(worker: WorkerProcess) -> Iterator:
    """The messages the worker has sent that are waiting, each as long as it is not marked dead (a
    message may mark it so); stops at a broken pipe (its sentinel tells what happened)."""
    while worker.state != "dead":
        try:
            if not worker.conn.poll():
                return
            message = worker.conn.recv()
        except (EOFError, OSError):
            return
        yield message


def exit_with_parent(parent: int) -> None:
    """Leave when the parent is gone (killed before it could stop us): no orphan keeps a GPU busy."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)
