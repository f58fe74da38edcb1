"""Damaged PDFs that pdfium renders and pikepdf (qpdf) cannot rebuild, written byte by byte, and probes
of the searchable PDFs made from them.

Each builder reproduces one way public PDFs broke the searchable-PDF writer:

- `looped_pages_pdf`: a /Pages node lists the root among its kids (a page tree that refers back to
  itself); pdfium walks it, qpdf stops ("Loop detected in /Pages structure"). Its three pages are
  one of each kind the writer stores: colour, grey, and black and white only (turned a quarter).
- `page_as_pages_root_pdf`: the catalog's /Pages is the page itself, no /Kids; pdfium takes that
  page for the document's only page, qpdf finds no pages ("root of pages tree has no /Kids array").
- `overcounted_pdf`: the root's /Count says 3 where it has 2 kids; pdfium counts 3 pages and
  cannot load the third, qpdf counts 2.
- `xmp_pdf`: a healthy page with an XMP packet; ``broken`` Flate-compresses a packet that is not
  Flate data, and pikepdf's default save stops ("While trying to update XMP metadata, an error
  occurred"), as it parses and rewrites the packet to state the PDF version.
"""

from __future__ import annotations

from pathlib import Path

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image

from kosmos_cli.documents import PDFIUM_LOCK
from tests.helpers.pdfs import _write_objects

HELVETICA = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
PAGE_WORD = "Printed"  # the word each page prints (as vector text, under the OCR lines' boxes)

# The pages of `looped_pages_pdf`: (MediaBox width, height, /Rotate, content). Page 1 has colour, page 2
# only greys, page 3 only black on white; each prints `PAGE_WORD` in Helvetica.
LOOPED_PAGES = [
    (300, 200, 0, b"0.9 0.1 0.1 rg 20 20 120 60 re f 0.1 0.3 0.9 rg 160 120 100 50 re f"),
    (250, 350, 0, b"0.5 g 30 30 150 100 re f 0.8 g 60 200 120 80 re f"),
    (400, 250, 90, b"0 g 30 30 100 40 re f 2 w 200 200 m 380 40 l S"),
]
DOCUMENT_XMP = (
    b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description rdf:about="" xmlns:pdf="http://ns.adobe.com/pdf/1.3/" pdf:PDFVersion="1.4" '
    b'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title><rdf:Alt><rdf:li xml:lang="x-default">'
    b'A damaged document</rdf:li></rdf:Alt></dc:title></rdf:Description></rdf:RDF></x:xmpmeta>\n'
    b'<?xpacket end="w"?>'
)


def _stream(data: bytes, extra: str = "") -> bytes:
    return f"<< /Length {len(data)}{extra} >>\nstream\n".encode() + data + b"\nendstream"


def _content(drawing: bytes) -> bytes:
    return drawing + f" 0 g BT /F1 14 Tf 40 100 Td ({PAGE_WORD}) Tj ET".encode()


def _page(parent: int | None, width: float, height: float, contents: int, font: int, rotate: int = 0) -> bytes:
    parent_entry = f" /Parent {parent} 0 R" if parent else ""
    rotation = f" /Rotate {rotate}" if rotate else ""
    return (f"<< /Type /Page{parent_entry} /MediaBox [0 0 {width} {height}]{rotation} /Contents {contents} 0 R "
            f"/Resources << /Font << /F1 {font} 0 R >> >> >>").encode()


def looped_pages_pdf(path: Path) -> Path:
    """Three pages (`LOOPED_PAGES`): root 2 → [page 3, node 5]; node 5 → [page 6, page 8, root 2]."""
    objs = {1: b"<< /Type /Catalog /Pages 2 0 R >>",
            2: b"<< /Type /Pages /Kids [3 0 R 5 0 R] /Count 3 >>",
            5: b"<< /Type /Pages /Parent 2 0 R /Kids [6 0 R 8 0 R 2 0 R] /Count 2 >>",
            10: HELVETICA}
    for (number, parent), (w, h, rotate, drawing) in zip(((3, 2), (6, 5), (8, 5)), LOOPED_PAGES):
        objs[number] = _page(parent, w, h, number + 1, 10, rotate)
        objs[number + 1] = _stream(_content(drawing))
    return _write_objects(path, objs)


def page_as_pages_root_pdf(path: Path) -> Path:
    """One 300×200 pt black-and-white page that the catalog's /Pages points at directly."""
    objs = {1: b"<< /Type /Catalog /Pages 2 0 R >>",
            2: _page(None, 300, 200, 3, 4),
            3: _stream(_content(b"0 g 20 20 80 40 re f")),
            4: HELVETICA}
    return _write_objects(path, objs)


def overcounted_pdf(path: Path) -> Path:
    """Pages of 300×200 and 200×300 pt under a root whose /Count is 3."""
    objs = {1: b"<< /Type /Catalog /Pages 2 0 R >>",
            2: b"<< /Type /Pages /Kids [3 0 R 5 0 R] /Count 3 >>",
            3: _page(2, 300, 200, 4, 7), 4: _stream(_content(b"0 g 20 20 80 40 re f")),
            5: _page(2, 200, 300, 6, 7), 6: _stream(_content(b"0 0 0.6 rg 20 200 80 40 re f")),
            7: HELVETICA}
    return _write_objects(path, objs)


def xmp_pdf(path: Path, *, broken: bool = False) -> Path:
    """A 300×200 pt page and `DOCUMENT_XMP` as the catalog's /Metadata; ``broken``: the stream says
    /FlateDecode, and its bytes are the plain packet."""
    metadata = " /Type /Metadata /Subtype /XML" + (" /Filter /FlateDecode" if broken else "")
    objs = {1: b"<< /Type /Catalog /Pages 2 0 R /Metadata 5 0 R >>",
            2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            3: _page(2, 300, 200, 4, 6), 4: _stream(_content(b"0 g 20 20 80 40 re f")),
            5: _stream(DOCUMENT_XMP, metadata),
            6: HELVETICA}
    return _write_objects(path, objs)


def pdfium_pages(path: Path | bytes) -> list[tuple[float, float] | None]:
    """Each page's size in points as pdfium gives it (None for a page pdfium cannot load)."""
    with PDFIUM_LOCK:
        doc = pdfium.PdfDocument(path if isinstance(path, bytes) else str(path))
        try:
            sizes = []
            for i in range(len(doc)):
                try:
                    page = doc[i]
                except pdfium.PdfiumError:
                    sizes.append(None)
                    continue
                sizes.append(tuple(page.get_size()))
                page.close()
            return sizes
        finally:
            doc.close()


def crisp_render(path: Path, index: int, size: tuple[int, int]) -> Image.Image:
    """Page ``index`` of ``path`` drawn by pdfium at ``size`` pixels without anti-aliasing (RGB)."""
    w, h = size
    flags = (pdfium_c.FPDF_ANNOT | pdfium_c.FPDF_REVERSE_BYTE_ORDER | pdfium_c.FPDF_RENDER_NO_SMOOTHTEXT
             | pdfium_c.FPDF_RENDER_NO_SMOOTHIMAGE | pdfium_c.FPDF_RENDER_NO_SMOOTHPATH)
    with PDFIUM_LOCK:
        doc = pdfium.PdfDocument(str(path))
        try:
            page = doc[index]
            bitmap = pdfium.PdfBitmap.new_native(w, h, pdfium_c.FPDFBitmap_BGR, rev_byteorder=True)
            bitmap.fill_rect((255, 255, 255, 255), 0, 0, w, h)
            pdfium_c.FPDF_RenderPageBitmap(bitmap.raw, page.raw, 0, 0, w, h, 0, flags)
            image = bitmap.to_pil().convert("RGB")
            bitmap.close()
            page.close()
            return image
        finally:
            doc.close()
