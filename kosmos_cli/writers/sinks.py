"""Sinks: where a run's page results go. One per run, each with one method, ``write(item, result)``.

``item`` is what the pipeline yields: a page job (rendered, or skipped because it is done), a failed
page or document, or an input that yielded nothing; ``result`` is its `PageResult`: the model's, a
failure record (``error`` set; page 0 for a whole document or input), or None (a skipped page, a note).

- `TextSink`: stdout, each page as its task's plain text (markdown, OCR lines, caption), with a
  ``<!-- SOURCE, page N -->`` line first when the run has several documents or pages.
- `JsonlSink`: stdout, one JSON object per page, failures included.
- `DirectorySink`: the ``-o`` folder (`OutputDir`): page state, documents once their last page is
  in, overlays.
"""

from __future__ import annotations

import sys
from typing import TextIO

from ..documents import DEFAULT_DPI
from ..pages import ErrorJob, PageJob
from ..results import PageResult
from ..tasks import Task
from .directory import OutputDir
from .formats import Original, page_comment
from .overlay import draw_overlay

__all__ = ["DirectorySink", "JsonlSink", "TextSink"]


class TextSink:
    def __init__(self, task: Task, *, several: bool, stream: TextIO | None = None):
        self.task = task
        self.several = several  # more than one document: mark each page's start
        self.stream = stream

    def write(self, item, result: PageResult | None) -> None:
        if result is None or not isinstance(item, PageJob):  # failures and skipped pages: no text
            return
        marked = self.several or len(item.selected) > 1 or item.page != 1
        header = page_comment(item.page, source=item.source) + "\n" if marked else ""
        _emit(self.stream, header + self.task.text(result).rstrip("\n") + "\n")


class JsonlSink:
    def __init__(self, stream: TextIO | None = None):
        self.stream = stream

    def write(self, item, result: PageResult | None) -> None:
        if result is not None:
            _emit(self.stream, result.to_json() + "\n")


class DirectorySink:
    """Writes under -o. A document whose write failed (disk full, a name the file system refuses)
    gets nothing more written in this run; the `OSError` is raised once, for the caller to report."""

    def __init__(self, out: OutputDir, *, overlay: bool = False, password: str | None = None,
                 dpi: float = DEFAULT_DPI):
        self.out = out
        self.overlay = overlay
        # The inputs' --password and --dpi, for the searchable PDF made from them (a PDF that cannot be
        # kept is drawn again at the resolution its pages were read at).
        self.password, self.dpi = password, dpi
        self.failed_stems: set[str] = set()

    def write(self, item, result: PageResult | None) -> None:
        if not isinstance(item, (PageJob, ErrorJob)) or item.page is None or item.stem in self.failed_stems:
            return  # an input or a whole document that failed: nothing of it to store
        stem = item.stem
        try:
            if result is not None:
                self.out.write_page(stem, result)
                if self.overlay and result.error is None and isinstance(item, PageJob):
                    self.out.write_overlay(stem, item.page, draw_overlay(item.image, result))
            if item.is_last:
                self.out.assemble(stem, item.selected, Original(item.source, self.password, self.dpi))
        except OSError:
            self.failed_stems.add(stem)
            raise


def _emit(stream: TextIO | None, text: str) -> None:
    stream = stream or sys.stdout  # looked up per call: tests and callers may swap sys.stdout
    stream.write(text)
    stream.flush()
