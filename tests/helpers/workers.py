"""Workers for the tests of `kosmos_cli.distributed`: a process that dies on chosen pages, a Ray actor
that waits to be killed, pages with OCR lines."""

from __future__ import annotations

import os
import signal
import time

from kosmos_cli.distributed.worker import Worker


class CrashingWorker(Worker):
    """Dies with SIGSEGV, as a crashing kernel would, when handed a page in ``crash_on`` (file name,
    page), ``delay`` seconds after it was handed; exits right after a page in ``exit_after`` is
    delivered. The driver builds it in the worker process from `functools.partial(CrashingWorker,
    crash_on=...)`, which pickles by reference: product code has no hook for it."""

    def __init__(self, *args, crash_on: frozenset[tuple[str, int]] = frozenset(), delay: float = 0.0,
                 exit_after: frozenset[tuple[str, int]] = frozenset(), **options):
        super().__init__(*args, **options)
        self.crash_on, self.delay, self.exit_after = crash_on, delay, exit_after

    def run(self, refs):
        def watched():
            for key, ref in refs:
                if (ref.source.name, ref.page) in self.crash_on:
                    time.sleep(self.delay)
                    os.kill(os.getpid(), signal.SIGSEGV)
                yield key, ref

        for record in super().run(watched()):
            yield record  # sent to the parent before this generator resumes
            if (record.item.source.name, record.item.page) in self.exit_after:
                os._exit(1)


class KilledOnceWorker(Worker):
    """On a Ray actor: the first time any worker meets the page ``dies_on`` (file name, page), it
    writes its actor's handle to ``handle`` (a file) and waits, that page in flight, for the test to
    `ray.kill` it; an actor that is not killed within ``patience`` seconds fails its batch."""

    def __init__(self, *args, dies_on: tuple[str, int], handle: str, patience: float = 60.0, **options):
        super().__init__(*args, **options)
        self.dies_on, self.handle, self.patience = dies_on, handle, patience

    def run(self, refs, ordered: bool = True):
        def watched():
            for key, ref in refs:
                if (ref.source.name, ref.page) == self.dies_on and not os.path.exists(self.handle):
                    import ray

                    with open(self.handle + ".tmp", "wb") as f:
                        f.write(ray.cloudpickle.dumps(ray.get_runtime_context().current_actor))
                    os.rename(self.handle + ".tmp", self.handle)
                    time.sleep(self.patience)
                    raise RuntimeError(f"not killed within {self.patience} s")
                yield key, ref

        return super().run(watched(), ordered)


class LinedWorker(Worker):
    """Gives the odd pages one OCR line (``with_line``), as a real model's text pages would have, and
    leaves the even ones without: records with and without lines in one run."""

    def run(self, refs, ordered: bool = True):
        for record in super().run(refs, ordered):
            if record.result is not None and record.item.page % 2:
                record.result.lines = [with_line(record.item.page)]
            yield record


def with_line(page: int) -> dict:
    """The line `LinedWorker` gives an odd page."""
    return {"text": f"page {page}", "polygon": [0, 0, 20, 0, 20, 8, 0, 8], "confidence": 0.5,
            "word_confidences": [0.25, 1.0]}
