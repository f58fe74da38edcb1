"""Document formats: a document's page results → the content of one of its files under -o.

A format is a function ``(task, results, original=None) -> str | bytes`` registered in `FORMATS` by
file suffix; a task lists the suffixes it writes by default (`Task.documents`) and those it writes
when asked (`Task.optional_documents`). ``results`` are the selected pages in page order; a page whose
``error`` is set keeps its place with a placeholder. ``original`` (an `Original`: the input file and
its password) is what the searchable PDF copies its pages from; the text formats need only the
results. A format that cannot be made from its input raises `FormatError`. A format's name (what
``--outputs`` takes) is its suffix's first part: ``txt`` for ``.txt``, ``alto`` for ``.alto.xml``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

from ..results import PageResult, source_text, valid_utf8
from ..tasks import Task
from .alto import alto_document
from .hocr import hocr_document
from .pdf import FormatError, Original, searchable_pdf

__all__ = ["FORMATS", "PAGE_SEPARATOR", "FormatError", "Original", "choose_documents", "format_name", "page_comment"]

PAGE_SEPARATOR = "\f\n"  # between pages in .txt files, as pdftotext does


def page_comment(page: int, error: str | None = None, source: str | os.PathLike | None = None) -> str:
    """``<!-- page 3 -->`` (with the source or an error when given), safe inside markdown and valid
    UTF-8; ``source`` as for `PageResult` (a path object is displayed, a str is display text)."""
    parts = []
    if source is not None:
        parts.append(source_text(source))
    parts.append(f"page {page}")
    body = ", ".join(parts)
    if error:
        body += f": error: {valid_utf8(str(error))}"
    return "<!-- " + body.replace("--", "- -") + " -->"


def markdown_document(task: Task, results: Sequence[PageResult], original: Original | None = None) -> str:
    """The pages' text, each after a ``<!-- page N -->`` comment (none for a lone page 1); a failed
    page is its comment with the error."""
    single = [r.page for r in results] == [1]
    parts = []
    for r in results:
        if r.error is not None:
            parts.append(page_comment(r.page, r.error))
        elif single:
            parts.append(task.text(r))
        else:
            parts.append(page_comment(r.page) + "\n\n" + task.text(r))
    return "\n\n".join(p.rstrip("\n") for p in parts) + "\n"


def text_document(task: Task, results: Sequence[PageResult], original: Original | None = None) -> str:
    """The pages' plain text separated by form feeds; a failed page is an empty section."""
    return PAGE_SEPARATOR.join(_terminated(task.text(r) if r.error is None else "") for r in results)


def json_document(task: Task, results: Sequence[PageResult], original: Original | None = None) -> str:
    """``{"source", "task", "model", "pages": [page objects]}``, indented."""
    first = results[0]
    doc = {
        "source": first.to_dict()["source"],
        "task": first.task,
        "model": first.model,
        "pages": [r.to_dict() for r in results],
    }
    return json.dumps(doc, ensure_ascii=False, indent=1) + "\n"


def _terminated(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


FORMATS: dict[str, Callable[[Task, Sequence[PageResult], Original | None], str | bytes]] = {
    ".md": markdown_document,
    ".txt": text_document,
    ".json": json_document,
    ".pdf": searchable_pdf,
    ".hocr": hocr_document,
    ".alto.xml": alto_document,
}


def format_name(suffix: str) -> str:
    """What ``--outputs`` calls the format of ``suffix``: ``.alto.xml`` → ``alto``."""
    return suffix.split(".")[1]


def choose_documents(task: Task, names: str) -> tuple[str, ...]:
    """The suffixes of the comma list of format names ``names`` (``"txt,hocr"``), in the task's order.

    ValueError, saying what the task can write, for an empty list or a name the task cannot write."""
    possible = {format_name(suffix): suffix for suffix in task.possible_documents}
    wanted = [name.strip() for name in names.split(",")]
    unknown = [name for name in wanted if name not in possible]
    if not names.strip():
        raise ValueError(f"no format given ({task.name} writes {','.join(possible)})")
    if unknown:
        raise ValueError(f"{task.name} cannot write {', '.join(map(repr, unknown))} (it writes {','.join(possible)})")
    return tuple(suffix for name, suffix in possible.items() if name in wanted)
