"""ALTO 4.4 of an OCR document: ``Page`` → ``PrintSpace`` → ``TextBlock`` → ``TextLine`` →
``String`` with ``SP`` between words, positions in rendered-page pixels (``MeasurementUnit`` pixel).

Every page selected gets its ``Page`` (``PHYSICAL_IMG_NR`` the page number in the input); Kosmos-2.5
finds no blocks, so a page's lines make one ``TextBlock`` around them all, and a failed page has an
empty ``PrintSpace``. Word boxes are split from their line's box (see `kosmos_cli.writers.markup`);
``OCRProcessing`` names kosmos and the model and says so. Confidences (0-1) are the page's ``PC`` and
each word's ``WC``, left out where unknown; ALTO has none for a ``TextLine``. The file validates
against the official schema (http://www.loc.gov/standards/alto/v4/alto-4-4.xsd; the tests check it).
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING

from .. import __version__
from ..results import PageResult
from ..tasks import Task
from .markup import Box, ocr_lines, probability, xml_attr, xml_text

if TYPE_CHECKING:
    from .pdf import Original

__all__ = ["alto_document"]

NAMESPACE = "http://www.loc.gov/standards/alto/ns-v4#"
SCHEMA = "http://www.loc.gov/standards/alto/v4/alto-4-4.xsd"


def alto_document(task: Task, results: Sequence[PageResult], original: Original | None = None) -> str:
    first = results[0]
    description = (f"Kosmos-2.5 OCR with the model {first.model}: text lines with boxes. Kosmos-2.5 finds "
                   "lines, not words: each String box is the part of its line's box that the word's characters "
                   "take up, an estimate.")
    head = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<alto xmlns="{NAMESPACE}" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:schemaLocation="{NAMESPACE} {SCHEMA}">',
        "<Description>",
        "<MeasurementUnit>pixel</MeasurementUnit>",
        f"<sourceImageInformation><fileName>{xml_text(first.to_dict()['source'])}</fileName></sourceImageInformation>",
        '<OCRProcessing ID="OCR_0"><ocrProcessingStep><processingSoftware>',
        f"<softwareName>kosmos</softwareName><softwareVersion>{__version__}</softwareVersion>",
        f"<applicationDescription>{xml_text(description)}</applicationDescription>",
        "</processingSoftware></ocrProcessingStep></OCRProcessing>",
        "</Description>",
        "<Layout>",
    ]
    return "\n".join([*head, *(_page(r) for r in results), "</Layout>", "</alto>"]) + "\n"


def _page(result: PageResult) -> str:
    p = result.page
    pc = _confidence("PC", probability(result.confidence))
    out = [f'<Page ID="p{p}" PHYSICAL_IMG_NR="{p}" WIDTH="{result.width}" HEIGHT="{result.height}"{pc}>',
           f'<PrintSpace {_position(Box(0, 0, result.width, result.height))}>']
    lines = ocr_lines(result)
    if lines:
        block = Box(min(ln.box.x0 for ln in lines), min(ln.box.y0 for ln in lines),
                    max(ln.box.x1 for ln in lines), max(ln.box.y1 for ln in lines))
        out.append(f'<TextBlock ID="p{p}_b1" {_position(block)}>')
        for i, line in enumerate(lines, 1):
            parts = []
            for j, word in enumerate(line.words, 1):
                if j > 1:
                    parts.append("<SP/>")
                parts.append(f'<String ID="p{p}_l{i}_w{j}" CONTENT="{xml_attr(word.text)}" {_position(word.box)}'
                             f'{_confidence("WC", word.confidence)}/>')
            out.append(f'<TextLine ID="p{p}_l{i}" {_position(line.box)}>{"".join(parts)}</TextLine>')
        out.append("</TextBlock>")
    out += ["</PrintSpace>", "</Page>"]
    return "\n".join(out)


def _confidence(name: str, value: float | None) -> str:
    """`` NAME="value"`` (an xsd:float written without an exponent: 0.0001234, not 1.234e-04), or
    nothing for an unknown value."""
    return "" if value is None else f' {name}="{format(Decimal(repr(value)), "f")}"'


def _position(box: Box) -> str:
    return f'HPOS="{box.x0}" VPOS="{box.y0}" WIDTH="{box.width}" HEIGHT="{box.height}"'
