"""Kept results: each finished request's upload and records, for ``--keep-results`` minutes, so that a
client (or the page at /) can fetch the records again, the document files the ``-o`` writer would make
(built from the kept records: the model does not run again) and the pages as rendered.

A result lives in a folder of its own under the server's private folder: the uploaded file, nothing
else (the records and a PDF's password stay in memory). Results past their time are deleted, and when
the kept files pass ``max_bytes`` the oldest go first. Only finished requests are kept; while a
request runs, the pages whose records have gone out can be fetched already (`start`, `with_pages`),
so that a viewer shows each page as it comes.
"""

from __future__ import annotations

import io
import math
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..documents import open_document
from ..results import PageResult
from ..tasks import Task
from ..writers.formats import FORMATS, Original

__all__ = ["Kept", "ResultStore"]


@dataclass
class Kept:
    """One finished request (or one under way: `ResultStore.start`)."""

    id: str
    task: Task
    name: str  # the upload's label
    path: Path  # the uploaded file, kept
    records: list[PageResult]
    password: str | None
    dpi: float
    expires: float  # time.monotonic()
    size: int

    @property
    def stem(self) -> str:
        """The document files' name: the label without its suffix."""
        return Path(self.name).stem or "document"

    def document(self, suffix: str) -> str | bytes:
        """The document file with ``suffix`` (one of the task's), from the kept records; FormatError
        where it cannot be made."""
        pages = [r for r in self.records if r.page >= 1]
        return FORMATS[suffix](self.task, pages, Original(self.path, self.password, self.dpi))

    def page_png(self, number: int) -> bytes | None:
        """Page ``number`` as rendered for the model (the working image), PNG; None if it has none."""
        if number not in {r.page for r in self.records}:
            return None
        with open_document(self.path, self.dpi, self.password) as document:
            image = document.page(number - 1).image
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()


class ResultStore:
    def __init__(self, root: Path, minutes: float, max_bytes: int):
        self.root, self.seconds, self.max_bytes = Path(root), minutes * 60, max_bytes
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._kept: OrderedDict[str, Kept] = OrderedDict()  # oldest first
        self._running: dict[str, Kept] = {}  # requests under way: their pages only
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    def start(self, id: str, task: Task, name: str, upload: Path, records: list[PageResult], password: str | None,
              dpi: float) -> None:
        """A request under way, ``records`` the list of those sent so far (the caller appends to it):
        its pages can be fetched as their records go out (`with_pages`)."""
        if self.enabled:
            with self._lock:
                self._running[id] = Kept(id, task, name, upload, records, password, dpi, math.inf, 0)

    def keep(self, id: str, task: Task, name: str, upload: Path, records: list[PageResult], password: str | None,
             dpi: float) -> None:
        """Keep a finished request: its upload moves into the store (or is deleted when keeping is off)."""
        if not self.enabled:
            upload.unlink(missing_ok=True)
            return
        folder = self.root / id
        folder.mkdir(mode=0o700)
        path = folder / ("upload" + upload.suffix)
        shutil.move(upload, path)
        size = path.stat().st_size + sum(len(r.to_json()) for r in records)
        with self._lock:
            self._running.pop(id, None)
            self._kept[id] = Kept(id, task, name, path, records, password, dpi, time.monotonic() + self.seconds, size)
        self.sweep()

    def forget(self, id: str) -> None:
        """A request that did not finish: its pages can no longer be fetched (its upload is the caller's)."""
        with self._lock:
            self._running.pop(id, None)

    def get(self, id: str) -> Kept | None:
        """A finished request."""
        self.sweep()
        with self._lock:
            return self._kept.get(id)

    def with_pages(self, id: str) -> Kept | None:
        """A finished request, or one under way (its pages so far)."""
        self.sweep()
        with self._lock:
            return self._kept.get(id) or self._running.get(id)

    def sweep(self) -> None:
        """Delete what is past its time, then the oldest while the kept bytes pass the bound."""
        now = time.monotonic()
        with self._lock:
            gone = [k for k in self._kept.values() if k.expires <= now]
            for kept in gone:
                del self._kept[kept.id]
            while self._kept and sum(k.size for k in self._kept.values()) > self.max_bytes:
                gone.append(self._kept.popitem(last=False)[1])
        for kept in gone:
            shutil.rmtree(self.root / kept.id, ignore_errors=True)

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()
            self._running.clear()
        shutil.rmtree(self.root, ignore_errors=True)
