"""The -o folder of one task: names that fit, page state, resume and document assembly."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from ..paths import display_path
from ..results import PageResult, valid_utf8
from ..tasks import Task, find_task
from .atomic import OutputError, store
from .formats import FORMATS, FormatError, Original

__all__ = ["NAME_MAX", "STATE_DIR", "OutputDir"]

STATE_DIR = ".kosmos"
NAME_MAX = 255  # bytes in one path component (ext4, APFS, NTFS in UTF-16 units, which are fewer)
# Every file of a document shares one base name, which leaves room for the longest suffix
# (.md, .txt, .json, .pdf, .hocr, .alto.xml are all shorter than an overlay's).
_LONGEST_SUFFIX = ".overlay-0000.png"


class OutputDir:
    """The ``-o OUT`` folder for one task: page state, document assembly and overlays.

    Typical use (`kosmos_cli.writers` describes the layout and the resume rules)::

        out = OutputDir("out", "ocr", model=model_id, overwrite=False)
        jobs = iter_pages(files, pages, dpi, skip=lambda j: out.is_done(j.stem, j.page))
        for job in prefetch(jobs):
            ... out.write_page(job.stem, result); out.assemble(job.stem, job.selected)

    ``documents`` are the document files to write, by suffix (default: the task's defaults; any of
    `Task.possible_documents`, else ValueError). ``warn`` is called with a message, once per page file
    that exists but cannot be read back (the page is then redone), and with what `assemble` has to say
    about a document file (a searchable PDF made from page images); writes that fail raise `OutputError`.
    """

    def __init__(self, root: str | os.PathLike, task: Task | str, *, model: str | None = None, overwrite: bool = False,
                 warn: Callable[[str], None] | None = None, documents: Sequence[str] | None = None):
        self.root = Path(root)
        self.task = find_task(task) if isinstance(task, str) else task
        self.documents = tuple(self.task.documents if documents is None else documents)
        if not set(self.documents) <= set(self.task.possible_documents):
            raise ValueError(f"{self.task.name} writes {', '.join(self.task.possible_documents)}, "
                             f"not {', '.join(sorted(set(self.documents) - set(self.task.possible_documents)))}")
        self.model = model
        self.overwrite = overwrite
        self.warn = warn or (lambda message: None)
        self._warned: set[Path] = set()
        self._warned_lock = threading.Lock()  # is_done runs in the prefetch thread, assemble in the caller's

    def __repr__(self) -> str:
        return f"OutputDir({str(self.root)!r}, task={self.task.name!r})"

    # paths
    @staticmethod
    def _name(folder: Path, stem: str, suffix: str = "") -> Path:
        """``folder/<stem><suffix>``, every component fitting NAME_MAX (see `kosmos_cli.writers`)."""
        *parents, last = stem.split("/")
        room = NAME_MAX - max(len(_LONGEST_SUFFIX), len(os.fsencode(suffix)))
        return folder.joinpath(*(_fit(p, NAME_MAX) for p in parents), _fit(last, room) + suffix)

    def page_file(self, stem: str, page: int) -> Path:
        return self._name(self.root / STATE_DIR / self.task.name, stem) / f"{page:04d}.json"

    def overlay_file(self, stem: str, page: int) -> Path:
        return self._name(self.root, stem, f".overlay-{page:04d}.png")

    @property
    def review_file(self) -> Path:
        """``OUT/<task>.review.tsv``: the pages listed by ``--review-below`` (`kosmos_cli.review`)."""
        return self.root / f"{self.task.name}.review.tsv"

    def write_review(self, content: str) -> Path:
        """Replace the review file atomically (left untouched when its content is the same)."""
        store(self.review_file, content.encode("utf-8"))
        return self.review_file

    def document_files(self, stem: str) -> list[Path]:
        """The files `assemble` writes for ``stem``."""
        return [self._name(self.root, stem, suffix) for suffix in self.documents]

    # pages
    def read_page(self, stem: str, page: int) -> PageResult | None:
        """The stored page, or None if absent or unusable (reported once through ``warn``)."""
        path = self.page_file(stem, page)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            problem = err.strerror or str(err)
        else:
            try:
                result = PageResult.from_json(data.decode("utf-8"))
                if result.page == page:
                    return result
                problem = f"it holds page {result.page}"
            except ValueError as err:  # invalid UTF-8 or JSON, or not a page object
                problem = str(err)
        with self._warned_lock:
            first = path not in self._warned
            self._warned.add(path)
        if first:
            self.warn(f"{display_path(path)}: unreadable page state ({valid_utf8(problem)}); "
                      f"page {page} will be redone")
        return None

    def is_done(self, stem: str, page: int) -> bool:
        """True if the page needs no work: stored without error, by the same model, and not overwriting."""
        if self.overwrite:
            return False
        r = self.read_page(stem, page)
        return r is not None and r.error is None and (self.model is None or r.model == valid_utf8(self.model))

    def failed_pages(self, stem: str, pages: Sequence[int]) -> list[int]:
        """The pages of ``pages`` stored with an error: the ones with a placeholder in the document."""
        return [p for p in sorted(set(pages)) if (r := self.read_page(stem, p)) is not None and r.error is not None]

    def write_page(self, stem: str, result: PageResult) -> Path:
        """Store one page's result atomically (rule 1); returns the page file."""
        path = self.page_file(stem, result.page)
        store(path, (result.to_json() + "\n").encode("utf-8"))
        return path

    def write_overlay(self, stem: str, page: int, image: Image.Image) -> Path:
        path = self.overlay_file(stem, page)
        png = io.BytesIO()
        image.save(png, format="PNG")
        store(path, png.getvalue())
        return path

    # documents
    def assemble(self, stem: str, pages: Sequence[int], original: Original | None = None) -> list[Path]:
        """Write the document files if every page in ``pages`` is stored (rule 2).

        Returns the document's files (rewritten only where their content changed), or [] while
        pages are missing. Failed pages get placeholders (see `kosmos_cli.writers`). ``original`` is
        the input file, which a searchable PDF is made from; what a format notes about a file (a
        searchable PDF made from page images) goes to ``warn``, after the file's path, unless
        ``original.note`` is set. A file that cannot be made (`FormatError`) or written raises
        `OutputError` once the document's other files are written.
        """
        results = []
        for page in sorted(set(pages)):
            r = self.read_page(stem, page)
            if r is None:
                return []
            results.append(r)
        if not results:
            return []
        paths = self.document_files(stem)
        failure = None
        for suffix, path in zip(self.documents, paths):
            try:
                if original is not None and _same_file(original.path, path):
                    raise FormatError("it is the input file itself; choose another -o folder")
                content = FORMATS[suffix](self.task, results, self._noted(original, path))
                store(path, content.encode("utf-8") if isinstance(content, str) else content)
            except FormatError as err:
                failure = failure or OutputError(path, err.reason)
            except OutputError as err:
                failure = failure or err
        if failure is not None:
            raise failure
        return paths

    def _noted(self, original: Original | None, path: Path) -> Original | None:
        """``original`` whose notes go to ``warn`` as ``PATH: note`` (unless it has its own ``note``)."""
        if original is None or original.note is not None:
            return original
        return dataclasses.replace(original, note=lambda text: self.warn(f"{display_path(path)}: {text}"))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (yet): not the same file
        return False


def _fit(name: str, room: int) -> str:
    """``name`` if it takes at most ``room`` bytes on disk; else its longest prefix of whole characters
    that leaves room for ``~`` and 8 hex digits of the SHA-1 of the whole name (distinct and stable)."""
    raw = os.fsencode(name)
    if len(raw) <= room:
        return name
    tag = "~" + hashlib.sha1(raw).hexdigest()[:8]
    budget, used, cut = room - len(tag), 0, 0
    for ch in name:  # a surrogate escape is one byte, a UTF-8 character one to four
        used += len(os.fsencode(ch))
        if used > budget:
            break
        cut += 1
    return name[:cut] + tag
