"""Kosmos-2.5 OCR: the ``<ocr>`` prompt and the parsing of its output into lines with polygons.

The model writes one line per text line, ``<bbox><x_53><y_573><x_69><y_606></bbox>text\\n``, with
coordinates in the pixels of its resized input image (the patch grid, ``width``×``height`` =
cols·16 × rows·16). `parse_ocr` scales them to the page as rendered (``page_w/width``,
``page_h/height``, truncated to int like the reference code), clips them to the page, and returns
`Line`s with the documented 8-point polygon ``[x0, y0, x1, y0, x1, y1, x0, y1]``.

Dropped, never raised on (generation may stop anywhere, e.g. at max_new_tokens):
- text before the first ``<bbox>`` and text after an incomplete box (``<bbox><x_12><y_3``): a line
  without a complete box has no position, and every line in the JSON schema has a polygon;
- boxes with x0 >= x1 or y0 >= y1 (before or after clipping), and lines whose text is empty.
A missing ``</bbox>`` is tolerated. A line cut in the middle of its text keeps its box and the text
that was generated (the page result's ``truncated`` flag tells the reader).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..confidence import TokenScores
from ..results import PageResult
from .base import Task

PROMPT = "<ocr>"

# Tokens that may survive decoding and are never page text.
_SPECIAL = re.compile(r"</?s>|<pad>|<unk>|<mask>|</?image>|</chunk>|</?bbox>|<ocr>|<md>|<[xy]_\d+>")
# A special token cut short at the very end of the output (only possible when text is decoded byte-wise).
_PARTIAL_TAIL = re.compile(r"\s*<(?:/?(?:b|bb|bbo|bbox)|[xy]_?\d*|/?s?|/)?\Z")
_RUN = re.compile(r"\S+")
_BOX = re.compile(r"\s*<x_(\d+)>\s*<y_(\d+)>\s*<x_(\d+)>\s*<y_(\d+)>\s*(?:</bbox>)?(.*)\Z", re.DOTALL)


@dataclass
class Line:
    """One OCR line: text and polygon ``[x0, y0, x1, y0, x1, y1, x0, y1]`` in page pixels; where it
    lies in the raw text, from its ``<bbox>`` to the next line's (``region``), and where each of its
    whitespace-separated words does (``word_regions``, None where they cannot be told apart)."""

    text: str
    polygon: list[int]
    region: tuple[int, int] = field(default=(0, 0), compare=False)
    word_regions: list[tuple[int, int]] | None = field(default=None, compare=False)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)``."""
        p = self.polygon
        return p[0], p[1], p[4], p[5]

    def to_dict(self, scores: TokenScores | None = None) -> dict:
        """The record's line; with ``scores``, its confidence and its words' (the line's where the
        words cannot be told apart)."""
        if scores is None:
            return {"text": self.text, "polygon": list(self.polygon)}
        confidence = scores.over(*self.region)
        if self.word_regions is None:
            words = [confidence] * len(self.text.split())
        else:  # a word that no token starts in (its text came with the word before) takes the line's
            words = [scores.over(*region) for region in self.word_regions]
            words = [confidence if word is None else word for word in words]
        return {"text": self.text, "polygon": list(self.polygon), "confidence": confidence,
                "word_confidences": words}


def _clean(text: str) -> str:
    """A line's text as generated -> its text in the record."""
    text = _PARTIAL_TAIL.sub("", _SPECIAL.sub("", text))
    return re.sub(r"\s*\n\s*", " ", text).strip()


def _word_regions(raw: str, start: int, end: int, words: int) -> list[tuple[int, int]] | None:
    """Where the ``words`` words of the line text in raw[start:end] lie: its whitespace-separated runs
    that keep some text once cleaned (a run of special tokens alone is dropped), each with the
    whitespace before it (BPE tokens carry the space before a word: " word"); None if that does not
    give one run a word (a cut special token at the end removed a run, say)."""
    ends = [m.end() for m in _RUN.finditer(raw, start, end) if _SPECIAL.sub("", m.group())]
    return list(zip([start, *ends], ends)) if len(ends) == words else None


def parse_ocr(raw: str, image_size: tuple[int, int], page_size: tuple[int, int]) -> list[Line]:
    """Parse raw ``<ocr>`` output into lines in page pixels.

    ``image_size``: (width, height) of the model's resized input, the space the coordinates live in.
    ``page_size``: (width, height) of the page as rendered, the space of the returned polygons.
    """
    width, height = image_size
    page_w, page_h = page_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    sx, sy = page_w / width, page_h / height
    lines: list[Line] = []
    starts = [m.start() for m in re.finditer("<bbox>", raw)]  # text before the first box has no position
    for start, end in zip(starts, [*starts[1:], len(raw)]):
        m = _BOX.match(raw, start + len("<bbox>"), end)
        if m is None:  # incomplete or malformed box
            continue
        x0, y0, x1, y1 = (int(v) for v in m.group(1, 2, 3, 4))
        if x0 >= x1 or y0 >= y1:
            continue
        text = _clean(m.group(5))
        if not text:
            continue
        x0, x1 = (min(max(int(v * sx), 0), page_w) for v in (x0, x1))
        y0, y1 = (min(max(int(v * sy), 0), page_h) for v in (y0, y1))
        if x0 >= x1 or y0 >= y1:  # entirely outside the page
            continue
        words = _word_regions(raw, m.start(5), end, len(text.split()))
        lines.append(Line(text, [x0, y0, x1, y0, x1, y1, x0, y1], (start, end), words))
    return lines


def ocr_text(lines: Iterable[Line]) -> str:
    """The page text: line texts in reading order (as generated), one per line."""
    return "\n".join(line.text for line in lines)


def format_line(line: Line | dict) -> str:
    """``x0,y0,x1,y0,x1,y1,x0,y1,text`` (the documented plain OCR format; text may contain commas)."""
    text, polygon = (line.text, line.polygon) if isinstance(line, Line) else (line["text"], line["polygon"])
    return ",".join(str(int(v)) for v in polygon) + "," + text


def page_fields(raw: str, model_size: tuple[int, int], page_size: tuple[int, int],
                scores: TokenScores | None = None) -> dict:
    """The page result's fields for raw ``<ocr>`` output: text and lines with page-pixel polygons,
    and with ``scores`` each line's confidence and its words'."""
    lines = parse_ocr(raw, image_size=model_size, page_size=page_size)
    return {"text": ocr_text(lines), "lines": [line.to_dict(scores) for line in lines]}


def page_text(result: PageResult) -> str:
    """The page's lines in the plain OCR format, one per line, no trailing newline."""
    return "\n".join(format_line(line) for line in result.to_dict()["lines"])


# A dense Kosmos-2.5 page runs past 2,000 tokens (6 box tokens per line): 3,072 fits full pages, and
# the loop guard ends degenerate pages long before that.
TASK = Task("ocr", "kosmos-2.5", "microsoft/kosmos-2.5", PROMPT, 3072, page_fields, page_text,
            documents=(".txt", ".json"), optional_documents=(".pdf", ".hocr", ".alto.xml"))
