"""The `kosmos` command (also `python -m kosmos_cli`): Ctrl-C is taken over before anything else is
imported, so that a press at any moment ends with exit code 130 and no traceback."""

from __future__ import annotations

import os
import sys

from . import interrupt


def main() -> None:
    interrupt.install()
    try:
        from .cli import app

        app()
    except KeyboardInterrupt:  # while importing, before the command handles it
        sys.stderr.write("kosmos: interrupted\n")
    except SystemExit as done:
        if done.code != 130:
            interrupt.finished()
            raise
    else:
        interrupt.finished()
        return
    # Interrupted: the run has wound down and its files are complete. Leave without the interpreter's
    # shutdown (joining worker threads, finalizers, atexit), where torch's native threads can abort
    # the process ("terminate called without an active exception").
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(130)


if __name__ == "__main__":
    main()
