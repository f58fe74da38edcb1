"""What the XML document formats (hOCR, ALTO) share: escaping any text into well-formed XML, and the
words of an OCR line with their boxes and confidences.

Kosmos-2.5 gives text lines with boxes, not words. Both formats want words, so a line's text is split
at whitespace and each word gets the slice of the line's box that its characters take up, counting the
spaces between words too: the boxes tile the line in reading order. They are an estimate, not a
measurement, and both files say so.

Confidences come from the record as they are (`kosmos_cli.confidence`): the line's ``confidence`` and
its ``word_confidences``, one per word of ``text.split()``, the words found here. Anything else (the
keys absent, as in records stored before confidences existed; a value that is not a number in [0, 1];
a word list of the wrong length) is None, unknown, and the formats leave it out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..results import PageResult

__all__ = ["Box", "Word", "OcrLine", "ocr_lines", "probability", "xml_attr", "xml_text"]

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


def probability(value: object) -> float | None:
    """``value`` if it is a confidence (a number in [0, 1], not a bool), else None (unknown); the
    overlay's colours read confidences through it too."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
        return float(value)
    return None


@dataclass(frozen=True)
class Word:
    text: str
    box: Box
    confidence: float | None = None


@dataclass(frozen=True)
class OcrLine:
    box: Box
    words: tuple[Word, ...]  # at least one
    confidence: float | None = None


def ocr_lines(result: PageResult) -> list[OcrLine]:
    """The page's lines with their words (none for a failed page). A line's box is its polygon's
    bounding box; a word's box spans the line's height and the width its characters take up. The
    page's own confidence is ``result.confidence``."""
    if result.error is not None:
        return []
    lines = []
    for line in result.to_dict()["lines"]:  # every string valid UTF-8
        xs, ys = line["polygon"][0::2], line["polygon"][1::2]
        box = Box(int(min(xs)), int(min(ys)), int(max(xs)), int(max(ys)))
        words = _words(line["text"].strip(), box, line.get("word_confidences"))
        if words:
            lines.append(OcrLine(box, words, probability(line.get("confidence"))))
    return lines


def _words(text: str, box: Box, confidences: object) -> tuple[Word, ...]:
    """Whitespace words of ``text`` with boxes split from ``box`` in proportion to characters, and
    their ``confidences`` (unknown unless a list of one per word)."""
    n = len(text)
    x = lambda i: box.x0 + round(box.width * i / n)  # the left edge of character i
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    if not isinstance(confidences, list) or len(confidences) != len(spans):
        confidences = [None] * len(spans)
    return tuple(Word(text[i:j], Box(x(i), box.y0, x(j), box.y1), probability(c))
                 for (i, j), c in zip(spans, confidences))
