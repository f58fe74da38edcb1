"""What the XML document formats (hOCR, ALTO) share: escaping any text into well-formed XML, and the
words of an OCR line with their boxes.

Kosmos-2.5 gives text lines with boxes, not words. Both formats want words, so a line's text is split
at whitespace and each word gets the slice of the line's box that its characters take up, counting the
spaces between words too: the boxes tile the line in reading order. They are an estimate, not a
measurement, and both files say so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..results import PageResult

__all__ = ["Box", "Word", "OcrLine", "ocr_lines", "xml_attr", "xml_text"]

# Characters XML 1.0 cannot hold at all: C0 controls other than tab, LF and CR; lone surrogates;
# U+FFFE and U+FFFF. Each becomes U+FFFD, so any text gives a well-formed file.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(text: str) -> str:
    """``text`` as XML character data."""
    text = _NOT_XML.sub("\ufffd", text)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def xml_attr(text: str) -> str:
    """``text`` as the value of a double-quoted XML attribute (tabs and line breaks kept: a parser
    would turn them into spaces if they were written out)."""
    return (xml_text(text).replace('"', "&quot;")
            .replace("\t", "&#9;").replace("\n", "&#10;").replace("\r", "&#13;"))


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in page pixels, ``x0 <= x1``, ``y0 <= y1``."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


@dataclass(frozen=True)
class Word:
    text: str
    box: Box


@dataclass(frozen=True)
class OcrLine:
    box: Box
    words: tuple[Word, ...]  # at least one


def ocr_lines(result: PageResult) -> list[OcrLine]:
    """The page's lines with their words (none for a failed page). A line's box is its polygon's
    bounding box; a word's box spans the line's height and the width its characters take up."""
    if result.error is not None:
        return []
    lines = []
    for line in result.to_dict()["lines"]:  # every string valid UTF-8
        xs, ys = line["polygon"][0::2], line["polygon"][1::2]
        box = Box(int(min(xs)), int(min(ys)), int(max(xs)), int(max(ys)))
        words = _words(line["text"].strip(), box)
        if words:
            lines.append(OcrLine(box, words))
    return lines


def _words(text: str, box: Box) -> tuple[Word, ...]:
    """Whitespace words of ``text`` with boxes split from ``box`` in proportion to characters."""
    n = len(text)
    x = lambda i: box.x0 + round(box.width * i / n)  # the left edge of character i
    return tuple(Word(m.group(), Box(x(m.start()), box.y0, x(m.end()), box.y1)) for m in re.finditer(r"\S+", text))
