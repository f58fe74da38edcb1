"""A worker for the tests of `kosmos_cli.distributed`: its process dies on chosen pages."""

from __future__ import annotations

import os
import signal

from kosmos_cli.distributed.worker import Worker


class CrashingWorker(Worker):
    """Dies with SIGSEGV, as a crashing kernel would, when handed a page in ``crash_on`` (file name,
    page). The driver builds it in the worker process from `functools.partial(CrashingWorker,
    crash_on=...)`, which pickles by reference: product code has no hook for it."""

    def __init__(self, *args, crash_on: frozenset[tuple[str, int]] = frozenset(), **options):
        super().__init__(*args, **options)
        self.crash_on = crash_on

    def run(self, refs):
        def watched():
            for key, ref in refs:
                if (ref.source.name, ref.page) in self.crash_on:
                    os.kill(os.getpid(), signal.SIGSEGV)
                yield key, ref

        return super().run(watched())
