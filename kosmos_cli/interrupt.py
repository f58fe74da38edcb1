"""Ctrl-C in the `kosmos` process: the first press stops the run, later presses are ignored while it
winds down (its files are written atomically, so nothing is left half-written either way)."""

from __future__ import annotations

import signal
import threading

_pressed = threading.Event()


def install() -> None:
    """Take over SIGINT (main thread only, as Python requires)."""
    _pressed.clear()
    signal.signal(signal.SIGINT, _on_ctrl_c)


def _on_ctrl_c(signum, frame) -> None:
    if not _pressed.is_set():
        _pressed.set()
        raise KeyboardInterrupt


def finished() -> None:
    """The run's outcome is decided and its files are written: ignore Ctrl-C while the interpreter shuts
    down. Part-way through shutdown Python puts back the default action, which kills the process (exit
    code -2, as if the run had failed); an ignored signal stays ignored to the end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check() -> None:
    """Raise again a Ctrl-C that library code swallowed (torch's optional NumPy import catches anything)."""
    if _pressed.is_set():
        raise KeyboardInterrupt
