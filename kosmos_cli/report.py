"""What a run tells its user on stderr: errors, notes (unless --quiet), the summary and the progress bar.

Messages are one line each, ``kosmos: <where>: <what>`` (``kosmos: note: ...`` for notes), with paths
as `display_path` text. stdout is left to the results. What the libraries a run calls would print on
their own (Python warnings, log records that reach the last-resort handler) is held back while the
command runs (`library_output_held`): what matters of it reaches the user as ours."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from .pages import ErrorJob
from .paths import display_path, os_reason
from .results import PageResult
from .tasks import Task

__all__ = ["LIBRARY_LOGGERS", "Progress", "Report", "library_output_held", "say"]

# The loggers of the libraries a run calls that warn about the files they read: pypdfium2 (an XFA form
# it cannot draw, unsupported features), Pillow (TIFF tags, it also logs before raising), pikepdf
# (qpdf's repairs). Printed raw, such a line would not name the file, and come once more from every
# worker that opens it; what matters of it is ours to say (a document's notes, a page's error).
LIBRARY_LOGGERS = ("pypdfium2", "PIL", "pikepdf")


def say(message: str, note: bool = False) -> None:
    """One line on stderr: ``kosmos: message`` (``kosmos: note: message``)."""
    sys.stderr.write(f"kosmos: {'note: ' if note else ''}{message}\n")


@contextmanager
def library_output_held() -> Iterator[None]:
    """For the command's run, in its own process or a worker process it started (each owns its
    process): the libraries' output stays off stderr. The warning filters the library leaves to its
    callers are set: torch's at import when NumPy is missing (not a dependency; nothing here needs it),
    Pillow's decompression-bomb warning, for an image we refuse with our own message anyway (see
    kosmos_cli.rasters), and every other warning Pillow raises about a file's metadata, which it
    reads past. And `LIBRARY_LOGGERS` get a handler of ours that drops their records, so that Python's
    last-resort handler (which prints records on stderr when no handler is found) does not; their
    levels and propagation, and the root logger, are left alone, so that handlers a caller configured
    still get every record. The handler is removed at the end of the block; the filters stay."""
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    handler = logging.NullHandler()
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


class Report:
    """What a run says on stderr (errors; notes unless --quiet) and the counts of its summary."""

    def __init__(self, task: Task, model: str, *, quiet: bool):
        self.task, self.model, self.quiet = task, model, quiet
        self.pages = self.failed = self.skipped = self.tokens = self.truncated = 0
        self.failed_inputs: set[str] = set()
        self.devices: dict[str, int] = {}  # pages per worker's device, when several share the run

    def note(self, message: str) -> None:
        if not self.quiet:
            say(message, note=True)

    def input_error(self, error) -> PageResult | None:
        """Report an input that yielded nothing; its failure record (page 0), None for a note."""
        where = display_path(error.path)
        if error.warning:
            self.note(f"{where}: {error.reason}")
            return None
        say(f"{where}: {error.reason}")
        self.failed_inputs.add(str(error.path))
        return PageResult.failed(error.path, 0, self.task.name, self.model, error.reason)

    def account(self, item, result: PageResult | None) -> PageResult | None:
        """Report and count one item of the run; returns the record its sink gets (a failed page's or
        document's failure record, page 0 for a whole document)."""
        if isinstance(item, ErrorJob):
            return self._failure(item)
        if item.skipped:
            self.skipped += 1
        elif result is not None:
            self.pages += 1
            self.truncated += result.truncated
            if result.error:
                say(f"{display_path(item.source)}: page {item.page}: {result.error}")
                self.failed += 1
        for note in item.notes:
            self.note(f"{display_path(item.source)}: page {item.page}: {note}")
        return result

    def _failure(self, item: ErrorJob) -> PageResult | None:
        where = display_path(item.source) + (f": page {item.page}" if item.page is not None else "")
        if item.warning:
            self.note(f"{where}: {item.error}")
            return None
        say(f"{where}: {item.error}")
        self.failed += 1
        self.failed_inputs.add(str(item.source))
        return PageResult.failed(item.source, item.page or 0, self.task.name, self.model, item.error)

    def write_failed(self, item, err: OSError) -> None:
        self.failed_inputs.add(str(item.source))
        target = getattr(err, "path", None) or err.filename
        what = f"cannot write {display_path(target)}" if target else "cannot write its output"
        say(f"{display_path(item.source)}: {what}: {os_reason(err)}")

    def page_done(self, result: PageResult, new_tokens: int, device: str | None = None) -> None:
        self.tokens += new_tokens
        if device is not None:
            self.devices[device] = self.devices.get(device, 0) + 1

    def per_device(self) -> str:
        """Pages per device, "cuda:0 12, cuda:1 11" (empty for a run on one device)."""
        return ", ".join(f"{device} {pages}" for device, pages in self.devices.items())

    def summary(self, seconds: float) -> None:
        rate = f"{self.pages / seconds:.2f} pages/s, {self.tokens / seconds:.0f} tokens/s" if seconds > 0 else ""
        parts = [f"{self.pages} page{'s' * (self.pages != 1)} in {seconds:.1f}s ({rate})"]
        if self.devices:
            parts.append(f"on {len(self.devices)} device{'s' * (len(self.devices) != 1)}: {self.per_device()}")
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        if self.skipped:
            parts.append(f"{self.skipped} already done")
        if self.failed:
            parts.append(f"{self.failed} failed")
        if self.failed_inputs:
            parts.append(f"problems in {len(self.failed_inputs)} input{'s' * (len(self.failed_inputs) != 1)}")
        say("; ".join(parts))


class Progress:
    """A rich progress bar on stderr (pages, pages/s, tokens/s, ETA), only when stderr is a terminal."""

    def __init__(self, enabled: bool, total: int | None, report: Report):
        self.enabled, self.total, self.report = enabled, total, report
        self.started = time.monotonic()
        self.bar = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=True,
                                # Results must stay on stdout; rich would route them to its console.
                                redirect_stdout=False)
            self.bar.__enter__()
            self.task = self.bar.add_task("pages", total=self.total, rate="")
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def advance(self, item) -> None:
        if self.bar is None or isinstance(item, ErrorJob):
            return
        elapsed = max(time.monotonic() - self.started, 1e-9)
        done = self.bar.tasks[0].completed + 1
        devices = f" ({self.report.per_device()})" if self.report.devices else ""
        self.bar.update(self.task, advance=1,
                        rate=f"{done / elapsed:.2f} pages/s, {self.report.tokens / elapsed:.0f} tok/s{devices}")
