"""hOCR 1.2 (XHTML) of an OCR document: ``ocr_page`` → ``ocr_line`` → ``ocrx_word``.

Every page selected gets its ``ocr_page`` (``bbox 0 0 W H`` in rendered-page pixels, ``ppageno``
counting from 0 as the spec does, ``image`` naming the input file); a failed page's is empty.
Word boxes are split from their line's box (see `kosmos_cli.writers.markup`); the ``description``
metadata says so. Each ``ocrx_word`` and ``ocr_line`` has its confidence as ``x_wconf`` (0-100, the
record's 0-1 value times 100, rounded), or no ``x_wconf`` where it is unknown.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote

from .. import __version__
from ..results import PageResult
from ..tasks import Task
from .markup import Box, ocr_lines, xml_attr, xml_text

if TYPE_CHECKING:
    from .pdf import Original

__all__ = ["hocr_document"]

DESCRIPTION = ("Kosmos-2.5 finds text lines, not words: each ocrx_word box is the part of its line's box "
               "that the word's characters take up, an estimate.")


def hocr_document(task: Task, results: Sequence[PageResult], original: Original | None = None) -> str:
    first = results[0]
    source = first.to_dict()["source"]
    head = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        "<!DOCTYPE html>",
        '<html xmlns="http://www.w3.org/1999/xhtml">',
        "<head>",
        f"<title>{xml_text(source)}</title>",
        '<meta http-equiv="Content-Type" content="text/html; charset=utf-8"/>',
        f'<meta name="ocr-system" content="{xml_attr(f"kosmos {__version__} ({first.model})")}"/>',
        '<meta name="ocr-capabilities" content="ocr_page ocr_line ocrx_word"/>',
        f'<meta name="ocr-number-of-pages" content="{len(results)}"/>',
        '<meta name="ocr-langs" content="unknown"/>',
        '<meta name="ocr-scripts" content="unknown"/>',
        f'<meta name="description" content="{DESCRIPTION}"/>',
        "</head>",
        "<body>",
    ]
    body = [_page(r, source) for r in results]
    return "\n".join([*head, *body, "</body>", "</html>"]) + "\n"


def _page(result: PageResult, source: str) -> str:
    # The image property is a quoted string of printable ASCII without '"': a percent-encoded path.
    title = f'image "{quote(source, safe="/")}"; bbox 0 0 {result.width} {result.height}; ppageno {result.page - 1}'
    out = [f'<div class="ocr_page" id="page_{result.page}" title="{xml_attr(title)}">']
    for i, line in enumerate(ocr_lines(result), 1):
        line_id = f"line_{result.page}_{i}"
        words = " ".join(f'<span class="ocrx_word" id="word_{result.page}_{i}_{j}" '
                         f'title="{_title(w.box, w.confidence)}">{xml_text(w.text)}</span>'
                         for j, w in enumerate(line.words, 1))
        out.append(f' <span class="ocr_line" id="{line_id}" title="{_title(line.box, line.confidence)}">{words}</span>')
    out.append("</div>")
    return "\n".join(out)


def _title(box: Box, confidence: float | None) -> str:
    """``bbox``, and ``x_wconf`` where the confidence is known."""
    title = f"bbox {box.x0} {box.y0} {box.x1} {box.y1}"
    return title if confidence is None else f"{title}; x_wconf {round(100 * confidence)}"
