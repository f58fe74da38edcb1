"""Inputs and probes for the searchable-PDF tests: a many-featured PDF built with pikepdf, OCR results
laid out on a page's pixels, pdfium renders and text extraction (each under `PDFIUM_LOCK`)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import pikepdf
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from pikepdf import Array, Dictionary, Name

from kosmos_cli.documents import PDFIUM_LOCK, page_pixels
from kosmos_cli.results import PageResult

# One line of every script the tests check; each fits one line box.
SCRIPT_LINES = [
    "Searchable text 0123456789",
    "Crème brûlée à la française",
    "Καλημέρα κόσμε",
    "Съешь же ещё этих булок",
    "東京都の天気は晴れです",
    "Party time 🎉😀 done",
    "(a) [b] \\c ന 屜 ⠩",  # code units holding the bytes ( ) \ and CR
]

VISIBLE = "VISIBLE"  # the printed word in the middle of every page of `feature_pdf`


def feature_pdf(
    path: Path,
    rotations: Sequence[int] = (0, 90, 180, 270),
    *,
    media: Sequence[float] = (0, 0, 600, 800),
    crop: Sequence[float] | None = (50, 60, 550, 760),
    own_font_named_kosmos: int | None = None,
    extras: bool = True,
) -> Path:
    """A PDF of one page per rotation: each draws a blue box, a red box and `VISIBLE` (Helvetica, 12 pt)
    centred in its CropBox. The font /F1 is inherited from the /Pages node; page ``own_font_named_kosmos``
    (0-based) instead has its own /Resources whose font /KosmosOCR is Courier, used for its word. With
    ``extras``: annotations on page 1, an outline and document info."""
    pdf = pikepdf.new()
    x0, y0, x1, y1 = crop if crop is not None else media
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    for k, rotate in enumerate(rotations):
        font = "KosmosOCR" if k == own_font_named_kosmos else "F1"
        content = (
            f"0.2 0.4 0.8 rg {x0 + 10} {y0 + 10} 80 40 re f\n"
            f"0.9 0.1 0.1 rg {x1 - 60} {y1 - 30} 50 20 re f\n"
            f"0 g BT /{font} 12 Tf {cx - 25} {cy - 4} Td ({VISIBLE}) Tj ET\n"
        ).encode()
        page = Dictionary(Type=Name.Page, MediaBox=Array(list(media)), Contents=pdf.make_stream(content))
        if crop is not None:
            page.CropBox = Array(list(crop))
        if rotate:
            page.Rotate = rotate
        if k == own_font_named_kosmos:
            courier = Dictionary(Type=Name.Font, Subtype=Name.Type1, BaseFont=Name.Courier)
            page.Resources = Dictionary(Font=Dictionary(KosmosOCR=pdf.make_indirect(courier)))
        pdf.pages.append(pikepdf.Page(page))
    helvetica = Dictionary(Type=Name.Font, Subtype=Name.Type1, BaseFont=Name.Helvetica,
                           Encoding=Name.WinAnsiEncoding)
    pdf.Root.Pages.Resources = Dictionary(Font=Dictionary(F1=pdf.make_indirect(helvetica)))
    if extras:
        pdf.pages[0].Annots = pdf.make_indirect(Array([
            pdf.make_indirect(Dictionary(Type=Name.Annot, Subtype=Name.Text, Contents=pikepdf.String("a note"),
                                         Rect=Array([x0 + 20, y1 - 80, x0 + 40, y1 - 60]), Open=False)),
            pdf.make_indirect(Dictionary(Type=Name.Annot, Subtype=Name.Link, Rect=Array([x0, y0, x0 + 50, y0 + 20]),
                                         Border=Array([0, 0, 0]),
                                         A=Dictionary(S=Name.URI, URI=pikepdf.String("https://example.org/")))),
        ]))
        with pdf.open_outline() as outline:
            for k in range(len(rotations)):
                outline.root.append(pikepdf.OutlineItem(f"Chapter {k + 1}", k))
        pdf.docinfo[Name.Title] = "A test document"
        pdf.docinfo[Name.Author] = "Kosmos tests"
        pdf.docinfo[Name.Subject] = "Ünïcode subject"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pdf.save(path, deterministic_id=True)
    return path


def pdf_page_pixels(path: Path, dpi: float, password: str | None = None) -> list[tuple[int, int]]:
    """Every page's full pixel size at ``dpi``, as the OCR renders it (rotation and CropBox applied)."""
    with PDFIUM_LOCK:
        doc = pdfium.PdfDocument(str(path), password=password)
        try:
            return [page_pixels(*doc[i].get_size(), dpi) for i in range(len(doc))]
        finally:
            doc.close()


Box = tuple[float, float, float, float]


def line_boxes(size: tuple[int, int], n: int, *, height: float | None = None) -> list[Box]:
    """``n`` line boxes ``(x0, y0, x1, y1)`` in whole pixels of a ``size`` page, in rows that keep clear of
    the page's middle fifth (where `feature_pdf` prints its word) and of each other."""
    w, h = size
    lh = height if height is not None else h / 40
    ys = [y for y in (h * 0.06 + i * lh * 1.6 for i in range(200)) if y + lh < h * 0.4]
    ys += [y for y in (h * 0.6 + i * lh * 1.6 for i in range(200)) if y + lh < h * 0.94]
    if len(ys) < n:
        raise ValueError(f"{n} lines do not fit")
    return [(round(w * 0.08), round(y), round(w * 0.92), round(y + lh)) for y in ys[:n]]


def polygon(box: Box) -> list[float]:
    x0, y0, x1, y1 = box
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def ocr_result(source: Path, page: int, size: tuple[int, int], texts: Sequence[str],
               boxes: Sequence[Box] | None = None, **kw) -> PageResult:
    """The OCR result of page ``page`` (1-based) rendered at ``size``: ``texts`` in `line_boxes`."""
    boxes = list(boxes) if boxes is not None else line_boxes(size, len(texts))
    lines = [{"text": t, "polygon": polygon(b)} for t, b in zip(texts, boxes)]
    return PageResult(source=str(source), page=page, task="ocr", model="test/model", width=size[0], height=size[1],
                      text="\n".join(texts), lines=lines, **kw)


def device_to_page(page, size: tuple[int, int], box: Box) -> Box:
    """A box of whole pixels of ``page`` rendered at ``size`` as (left, bottom, right, top) in page space,
    mapped by pdfium (``FPDF_DeviceToPage``, which takes CropBox, MediaBox and /Rotate into account)."""
    w, h = size
    xs, ys = [], []
    for x, y in ((box[0], box[1]), (box[2], box[3])):
        px, py = ctypes.c_double(), ctypes.c_double()
        ok = pdfium_c.FPDF_DeviceToPage(page.raw, 0, 0, w, h, 0, int(x), int(y), px, py)
        assert ok
        xs.append(px.value)
        ys.append(py.value)
    return min(xs), min(ys), max(xs), max(ys)


def page_texts(data: bytes | Path, boxes: dict[int, tuple[tuple[int, int], list]] | None = None):
    """``(whole-page texts, {page: [text of each box]})`` of a PDF by pdfium; ``boxes`` maps a 0-based
    page to its pixel size and the pixel boxes to read."""
    boxes = boxes or {}
    with PDFIUM_LOCK:
        doc = pdfium.PdfDocument(data if isinstance(data, bytes) else str(data))
        try:
            whole, bounded = [], {}
            for i in range(len(doc)):
                page = doc[i]
                textpage = page.get_textpage()
                whole.append(textpage.get_text_range())
                if i in boxes:
                    size, page_boxes = boxes[i]
                    bounded[i] = [textpage.get_text_bounded(*device_to_page(page, size, b)) for b in page_boxes]
                textpage.close()
                page.close()
            return whole, bounded
        finally:
            doc.close()


def render(data: bytes | Path, scale: float = 1.0, size: tuple[int, int] | None = None, *, forms: bool = False) -> list:
    """Every page rendered by pdfium (annotations drawn, and filled form fields with ``forms``) as a PIL
    RGB image: at ``scale``, or at exactly ``size`` pixels (a bitmap of that size, the page fitted to it)."""
    with PDFIUM_LOCK:
        doc = pdfium.PdfDocument(data if isinstance(data, bytes) else str(data))
        try:
            if forms:
                doc.init_forms()
            out = []
            for i in range(len(doc)):
                page = doc[i]
                if size is None:
                    out.append(page.render(scale=scale, may_draw_forms=forms).to_pil().convert("RGB"))
                else:
                    w, h = size
                    bitmap = pdfium.PdfBitmap.new_native(w, h, pdfium_c.FPDFBitmap_BGR, rev_byteorder=True)
                    bitmap.fill_rect((255, 255, 255, 255), 0, 0, w, h)
                    pdfium_c.FPDF_RenderPageBitmap(bitmap.raw, page.raw, 0, 0, w, h, 0,
                                                   pdfium_c.FPDF_ANNOT | pdfium_c.FPDF_REVERSE_BYTE_ORDER)
                    out.append(bitmap.to_pil().convert("RGB"))
                    bitmap.close()
                page.close()
            return out
        finally:
            doc.close()
