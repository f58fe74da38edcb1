"""Searchable PDF of an OCR document: the input's own pages with the OCR lines as invisible text.

- **PDF input.** The input file, its pages, content, fonts, annotations, forms, outline and metadata
  (the XMP packet byte for byte) as they are, plus on each page that has OCR lines a text layer drawn
  after the page's content (which is wrapped in ``q``/``Q`` so that the layer starts from the default
  graphics state). Pages not selected, failed, or without lines are not touched. An encrypted input is
  written decrypted.
- **A PDF that cannot be kept.** Where pikepdf (qpdf) cannot rebuild the input although pdfium renders
  it (it cannot open it, cannot walk its page tree, finds another page count than pdfium, or cannot
  save it), the file is made from page images instead: every page of the input, selected or not, as
  pdfium renders it at the run's ``--dpi`` (`Original.dpi`), one page at a time, on a page of the size
  pdfium gives it. A page whose content is only black and white (as drawn without anti-aliasing) is
  stored that way, 1 bit a pixel, Flate-compressed (lossless); other pages are drawn anti-aliased and
  stored as JPEG (quality 90), grey where they have no colour. A page pdfium cannot render is a blank
  page. The text layer is the same as on a kept page, and `Original.note` is told why.
- **Image input.** A page per image, every TIFF frame a page (those not selected get no text). JPEG
  files are embedded as they are (their bytes, DCTDecode); other images keep their pixels, bit depth
  (1, 8 or 16 bits) and alpha, Flate-compressed; only float and 32-bit integer samples, which PDF has
  no form for, are stored as the 8-bit pixels the model read. The page size comes from the image's
  DPI when it has a sensible one (10 to 10,000), else from `DEFAULT_IMAGE_DPI`; the EXIF orientation
  is applied by the drawing matrix, as the OCR saw the image.
- **The text layer.** One text object a line, in the model's order, in render mode 3 (invisible),
  in a glyph-less font (`kosmos_cli.writers.glyphless`): the line's box, mapped from the rendered
  page's pixels to the page's user space exactly as pdfium renders it (CropBox, MediaBox offsets,
  /Rotate), holds the line's em box, and the text is stretched to the box's width, so that selecting
  text in a viewer highlights the printed line and extracting a box's text gives that line.

Output is deterministic (the same results give the same bytes), so a re-run leaves the file alone.
"""

from __future__ import annotations

import io
import os
import re
import zlib
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageChops

from .. import rasters
from ..documents import (
    DEFAULT_DPI,
    MAX_PIXELS,
    PDFIUM_LOCK,
    DocumentError,
    open_document,
    page_pixels,
    password_candidates,
)
from ..results import PageResult
from ..tasks import Task
from .glyphless import ADVANCE, ASCENT, DESCENT, FONT_NAME, UNITS, Encoding, cid_to_gid_map, truetype_font

__all__ = ["DEFAULT_IMAGE_DPI", "FormatError", "Original", "searchable_pdf"]

DEFAULT_IMAGE_DPI = 300.0  # an image without a sensible DPI is taken as a 300-dpi scan
_MAX_PAGE_POINTS = 14400.0  # the largest page PDF readers accept (200 inches): larger images get more DPI
_FONT_RESOURCE = "KosmosOCR"
_JPEG_QUALITY = 90  # page images of a PDF that cannot be kept, where they are not black and white
_LETTER = (612.0, 792.0)  # the size of a page pdfium cannot load, when no page before it has one

Matrix = tuple[float, float, float, float, float, float]


@dataclass(frozen=True)
class Original:
    """The input file a document's files are made from, its --password and the run's --dpi (at which
    a PDF that cannot be kept is rendered again); ``note`` hears, in a sentence, of a file made in a way
    its user should know about (a searchable PDF made from page images)."""

    path: Path
    password: str | None = None
    dpi: float = DEFAULT_DPI
    note: Callable[[str], None] | None = field(default=None, compare=False, repr=False)


class FormatError(Exception):
    """A document file that cannot be made from its input (``reason`` says why); the document's other
    files are still written."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def searchable_pdf(task: Task, results: Sequence[PageResult], original: Original | None = None) -> bytes:
    """The searchable PDF of ``results`` (the selected pages, in order) over ``original``."""
    import pikepdf

    if original is None:
        raise FormatError("a searchable PDF is made from its input file, and none was given")
    try:
        doc = open_document(original.path, password=original.password)
    except DocumentError as err:
        raise FormatError(err.reason) from None
    by_page = {r.page: r for r in results if r.error is None and r.lines and r.width > 0 and r.height > 0}
    encoding = Encoding(line["text"] for r in by_page.values() for line in r.to_dict()["lines"])
    with doc:
        missing = [n for n in by_page if not 1 <= n <= doc.num_pages]
        if missing:  # the input changed since its pages were done
            raise FormatError(f"page {missing[0]} is not in the file")
        if doc.kind == "pdf":
            try:
                return _over_original(original, doc, by_page, encoding)
            except FormatError as err:
                not_kept = err.reason
        blank: list[int] = []
        try:
            pdf = pikepdf.new()
            if doc.kind == "pdf":
                sizes, blank = _add_page_images(pdf, original, doc.num_pages)
            else:
                sizes = [_add_image_page(pdf, original.path, index) for index in range(doc.num_pages)]
            # The page's points over the result's pixels (the page's size as rendered, or as displayed).
            maps = {n: (sizes[n - 1][0] / r.width, 0.0, 0.0, -sizes[n - 1][1] / r.height, 0.0, sizes[n - 1][1])
                    for n, r in by_page.items()}
            data = _with_text(pdf, encoding, by_page, maps)
        except (rasters.Unreadable, FormatError, pikepdf.PdfError) as err:
            reason = getattr(err, "reason", None) or f"cannot write this PDF ({err})"
            if doc.kind == "pdf":
                reason = f"{not_kept}, nor from page images: {reason}"
            raise FormatError(reason) from None
    if doc.kind == "pdf" and original.note is not None:
        original.note(_made_from_images(not_kept, blank))
    return data


def _made_from_images(reason: str, blank: list[int]) -> str:
    """The note on a searchable PDF made from page images: why, and which pages are blank."""
    note = f"the original could not be kept ({reason}); the searchable PDF is made from page images"
    if len(blank) == 1:
        note += f" (page {blank[0]}, which pdfium cannot render, is blank)"
    elif blank:
        note += f" (pages {', '.join(map(str, blank))}, which pdfium cannot render, are blank)"
    return note


def _over_original(original: Original, doc, by_page: dict[int, PageResult], encoding: Encoding) -> bytes:
    """The input PDF itself with the text layers; FormatError, saying why, where pikepdf cannot rebuild it."""
    import pikepdf

    pdf = _open_pdf(original)
    try:
        with pdf:
            try:
                count = len(pdf.pages)
            except pikepdf.PdfError as err:
                raise FormatError(f"pikepdf cannot find its pages: {_qpdf_message(err, original.path)}") from None
            if count != doc.num_pages:
                raise FormatError(f"pikepdf finds {count} page{'s' * (count != 1)} where pdfium finds {doc.num_pages}")
            maps = {n: doc.pixel_to_page(n - 1, (r.width, r.height)) for n, r in by_page.items()}
            return _with_text(pdf, encoding, by_page, maps)
    except pikepdf.PdfError as err:
        raise FormatError(f"pikepdf cannot write it: {_qpdf_message(err, original.path)}") from None
    except (TypeError, ValueError, RecursionError) as err:  # pikepdf's word for objects of the wrong kind
        raise FormatError(f"pikepdf cannot write it: {type(err).__name__}: {err}") from None


def _with_text(pdf, encoding: Encoding, by_page: dict[int, PageResult], maps: dict[int, Matrix]) -> bytes:
    """``pdf`` with each result's text layer on its page (``maps``: the result's pixels → the page's
    user space), saved."""
    font = _add_font(pdf, encoding) if by_page else None
    for n, result in by_page.items():
        _add_text_layer(pdf, pdf.pages[n - 1], font, encoding, result, maps[n])
    out = io.BytesIO()
    # fix_metadata_version=False: the XMP packet stays as it is. pikepdf would parse it and write it
    # anew (to state the PDF version), and stops the save on a packet it cannot read.
    pdf.save(out, encryption=False, deterministic_id=True, fix_metadata_version=False)
    return out.getvalue()


def _qpdf_message(err: Exception, path: Path) -> str:
    """qpdf's message without the file's path it starts with (messages name the file already):
    ``/in/a.pdf (object 2 0): loop`` → ``object 2 0: loop``."""
    text = str(err)
    if text.startswith(str(path)):
        text = re.sub(r"^:?\s*(?:\((.*?)\):\s*)?", lambda m: f"{m[1]}: " if m[1] else "", text[len(str(path)):])
    return text or str(err)


def _open_pdf(original: Original):
    """The input opened with pikepdf (the passwords `documents` tries, in its order)."""
    import pikepdf

    tries = [None] if original.password is None else password_candidates(original.password)
    if original.password is not None:
        try:  # RC4 and AES-128 passwords are Latin-1 bytes (pdfium converts them itself, qpdf does not)
            tries.insert(1, original.password.encode("latin-1"))
        except UnicodeEncodeError:
            pass
    for password in tries:
        try:
            return pikepdf.open(original.path, password=password or "")
        except pikepdf.PasswordError:
            continue
        except (pikepdf.PdfError, OSError) as err:
            raise FormatError(f"pikepdf cannot read it: {_qpdf_message(err, original.path)}") from None
    raise FormatError("pikepdf cannot decrypt it with the password given")


# --------------------------------------------------------------------------------------------------
# The text layer
# --------------------------------------------------------------------------------------------------


def _add_font(pdf, encoding: Encoding):
    """The glyph-less Type0 font, one indirect object for the whole file."""
    from pikepdf import Array, Dictionary, Name

    font_data = truetype_font()
    font_file = pdf.make_stream(zlib.compress(font_data, 9), Filter=Name.FlateDecode)
    font_file.Length1 = len(font_data)
    descriptor = Dictionary(
        Type=Name.FontDescriptor, FontName=Name("/" + FONT_NAME), Flags=5,  # fixed pitch, symbolic
        FontBBox=Array([0, DESCENT, ADVANCE, ASCENT]), ItalicAngle=0, Ascent=ASCENT, Descent=DESCENT,
        CapHeight=ASCENT, StemV=80, FontFile2=font_file,
    )
    cid_font = Dictionary(
        Type=Name.Font, Subtype=Name.CIDFontType2, BaseFont=Name("/" + FONT_NAME),
        CIDSystemInfo=Dictionary(Registry="Adobe", Ordering="Identity", Supplement=0),
        FontDescriptor=pdf.make_indirect(descriptor), DW=ADVANCE,
        CIDToGIDMap=pdf.make_stream(cid_to_gid_map(), Filter=Name.FlateDecode),
    )
    font = Dictionary(
        Type=Name.Font, Subtype=Name.Type0, BaseFont=Name("/" + FONT_NAME), Encoding=Name("/Identity-H"),
        DescendantFonts=Array([pdf.make_indirect(cid_font)]), ToUnicode=pdf.make_stream(encoding.to_unicode()),
    )
    return pdf.make_indirect(font)


def _add_text_layer(pdf, page, font, encoding: Encoding, result: PageResult, pixel_to_page: Matrix) -> None:
    from pikepdf import Dictionary, Name

    # The page gets its own resources and font dictionaries (shallow copies: the entries stay shared),
    # since pages often share one, inherited or not, and the pages not selected must stay as they were.
    resources = page.obj.get(Name.Resources) or _inherited(page.obj, Name.Resources) or Dictionary()
    fonts = Dictionary({key: value for key, value in resources.get(Name.Font, Dictionary()).items()})
    page.obj.Resources = Dictionary({**{key: value for key, value in resources.items()}, "/Font": fonts})
    name, n = _FONT_RESOURCE, 0
    while Name("/" + name) in fonts:
        n += 1
        name = f"{_FONT_RESOURCE}{n}"
    fonts[Name("/" + name)] = font
    # A newline first: the page's content may end in a comment, which would swallow the Q.
    page.contents_add(b"q\n", prepend=True)
    page.contents_add(b"\nQ\n" + _text_operators(name, encoding, result, pixel_to_page))


def _inherited(node, key):
    """``key`` of the nearest ancestor in the page tree that has it (PDF 1.7, 7.7.3.4), or None."""
    seen = 0
    while node is not None and seen < 64:  # a looped /Parent chain ends here, not in an endless walk
        if key in node:
            return node[key]
        node = node.get("/Parent")
        seen += 1
    return None


def _text_operators(font_name: str, encoding: Encoding, result: PageResult, pixel_to_page: Matrix) -> bytes:
    """``BT ... ET`` with one ``Tm``/``Tj`` a line: font size 1, the line's em box and width in the
    text matrix (x stretched to the box's width, y to its height), baseline at the em box's descent."""
    a, b, c, d, e, f = pixel_to_page
    ops = [b"BT", b"3 Tr", f"/{font_name} 1 Tf".encode()]
    for line in result.to_dict()["lines"]:
        p = line["polygon"]
        x0, x1, y0, y1 = min(p[0::2]), max(p[0::2]), min(p[1::2]), max(p[1::2])
        codes = encoding.encode(line["text"])
        if not codes or x1 <= x0 or y1 <= y0:
            continue
        sx = (x1 - x0) / (len(codes) // 2 * ADVANCE / UNITS)  # pixels a text-space unit, along the line
        sy = y1 - y0  # one em (ASCENT - DESCENT = UNITS) is the box's height
        bx, by = x0, y1 + DESCENT / UNITS * sy  # the baseline's start, in pixels (y down)
        tm = (a * sx, b * sx, -c * sy, -d * sy, a * bx + c * by + e, b * bx + d * by + f)
        ops.append(" ".join(map(_number, tm)).encode() + b" Tm " + _literal(codes) + b" Tj")
    ops.append(b"ET")
    return b"\n".join(ops) + b"\n"


def _number(v: float) -> str:
    text = f"{v:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _literal(data: bytes) -> bytes:
    """A PDF literal string of ``data``: backslash, parentheses and CR escaped (a reader turns a raw
    CR into LF)."""
    return b"(" + data.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)").replace(b"\r", b"\\r") + b")"


# --------------------------------------------------------------------------------------------------
# Image pages
# --------------------------------------------------------------------------------------------------

# EXIF orientation → where the stored image's corners go, as the image space (x right, y up, the
# unit square) → the displayed page's unit square: (a, b, c, d, e, f).
_ORIENTED: dict[int, Matrix] = {
    1: (1, 0, 0, 1, 0, 0), 2: (-1, 0, 0, 1, 1, 0), 3: (-1, 0, 0, -1, 1, 1), 4: (1, 0, 0, -1, 0, 1),
    5: (0, -1, -1, 0, 1, 1), 6: (0, -1, 1, 0, 0, 1), 7: (0, 1, 1, 0, 0, 0), 8: (0, 1, -1, 0, 1, 0),
}


def _add_image_page(pdf, path: Path, index: int) -> tuple[float, float]:
    """Append frame ``index`` of the image file as a page; returns the page's width and height in points."""
    with rasters.open_frame(path, index, MAX_PIXELS) as (im, orientation):
        image = _image_xobject(pdf, im, path)
        (w, h), (dx, dy) = im.size, _dpi(im)
    orientation = orientation if orientation in _ORIENTED else 1
    width_in, height_in = w / dx, h / dy
    if orientation >= 5:  # a quarter turn: the displayed page is the stored one on its side
        w, h, width_in, height_in = h, w, height_in, width_in
    shrink = min(1.0, _MAX_PAGE_POINTS / (72 * max(width_in, height_in)))
    pw, ph = 72 * width_in * shrink, 72 * height_in * shrink
    _append_page(pdf, (pw, ph), image, _ORIENTED[orientation])
    return pw, ph


def _append_page(pdf, size: tuple[float, float], image=None, placement: Matrix = _ORIENTED[1]) -> None:
    """Append a page of ``size`` points that shows ``image`` (an image XObject; None: a blank page),
    the unit square mapped onto the page by ``placement``."""
    from pikepdf import Array, Dictionary, Name, Page

    pw, ph = size
    resources, draw = Dictionary(), ""
    if image is not None:
        a, b, c, d, e, f = placement
        resources = Dictionary(XObject=Dictionary(Im0=image))
        draw = f"q {' '.join(_number(v) for v in (a * pw, b * ph, c * pw, d * ph, e * pw, f * ph))} cm /Im0 Do Q\n"
    page = Dictionary(
        Type=Name.Page, MediaBox=Array([0, 0, round(pw, 4), round(ph, 4)]), Resources=resources,
        Contents=pdf.make_stream(draw.encode()),
    )
    pdf.pages.append(Page(page))


def _dpi(im: Image.Image) -> tuple[float, float]:
    dpi = im.info.get("dpi")
    try:
        x, y = (float(v) for v in dpi)
    except (TypeError, ValueError):
        return DEFAULT_IMAGE_DPI, DEFAULT_IMAGE_DPI
    if 10 <= x <= 10000 and 10 <= y <= 10000:
        return x, y
    return DEFAULT_IMAGE_DPI, DEFAULT_IMAGE_DPI


def _image_xobject(pdf, im: Image.Image, path: Path):
    """The image as a PDF image XObject: a JPEG's own bytes, else its pixels losslessly (Flate)."""
    from pikepdf import Array, Name

    if im.format == "JPEG" and im.mode in ("L", "RGB", "CMYK"):
        stream = pdf.make_stream(Path(path).read_bytes(), Filter=Name.DCTDecode)
        _describe(stream, im.size, im.mode, 8)
        if im.mode == "CMYK" and "adobe" in im.info:  # Adobe CMYK JPEGs store their inks inverted
            stream.Decode = Array([1, 0] * 4)
        return stream
    if im.mode == "P" or im.mode == "PA":
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return _flate_image(pdf, im.tobytes("raw", "I;16B"), im.size, "L", 16)
    if im.mode in ("RGBa", "RGBX"):
        im = im.convert("RGBA" if im.mode == "RGBa" else "RGB")
    elif im.mode == "La":
        im = im.convert("LA")
    elif im.mode not in ("1", "L", "LA", "RGB", "RGBA", "CMYK"):
        im = rasters.eight_bit(im)  # float, 32-bit, YCbCr, LAB, HSV: the pixels the model read
    alpha = None
    if im.mode in ("LA", "RGBA"):
        alpha = _flate_image(pdf, im.getchannel("A").tobytes(), im.size, "L", 8)
        im = im.convert(im.mode[:-1])
    stream = _flate_image(pdf, im.tobytes(), im.size, im.mode, 1 if im.mode == "1" else 8)
    if alpha is not None:
        stream.SMask = alpha
    return stream


def _flate_image(pdf, data: bytes, size: tuple[int, int], mode: str, bits: int):
    from pikepdf import Name

    stream = pdf.make_stream(zlib.compress(data, 6), Filter=Name.FlateDecode)
    _describe(stream, size, mode, bits)
    return stream


def _describe(stream, size: tuple[int, int], mode: str, bits: int) -> None:
    from pikepdf import Name

    stream.Type, stream.Subtype = Name.XObject, Name.Image
    stream.Width, stream.Height = size
    stream.ColorSpace = {"1": Name.DeviceGray, "L": Name.DeviceGray, "RGB": Name.DeviceRGB,
                         "CMYK": Name.DeviceCMYK}[mode]
    stream.BitsPerComponent = bits


# --------------------------------------------------------------------------------------------------
# A PDF that cannot be kept: its pages as images
# --------------------------------------------------------------------------------------------------


def _add_page_images(pdf, original: Original, num_pages: int) -> tuple[list[tuple[float, float]], list[int]]:
    """Append every page of the PDF ``original`` as pdfium renders it at ``original.dpi``, one at a time;
    returns the pages' sizes in points and the pages pdfium cannot render (blank, the size pdfium
    gives them, or the size of the page before when it cannot even load them)."""
    sizes: list[tuple[float, float]] = []
    blank: list[int] = []
    with _pdfium_document(original) as source:
        for index in range(num_pages):
            size, pixels, crisp = _render_page(source, index, original.dpi)
            size = size or (sizes[-1] if sizes else _LETTER)
            if pixels is None:
                blank.append(index + 1)
            _append_page(pdf, size, None if pixels is None else _page_image(pdf, pixels, crisp))
            sizes.append(size)
            del pixels  # one page's pixels at a time
    return sizes, blank


@contextmanager
def _pdfium_document(original: Original):
    """The PDF opened by pdfium as `documents` opens it (its passwords, in its order; forms drawn)."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    path = os.fsencode(original.path) + b"\0"
    tries = [None] if original.password is None else password_candidates(original.password)
    with PDFIUM_LOCK:
        for password in tries:
            raw = pdfium_c.FPDF_LoadDocument(path, None if password is None else password + b"\0")
            if raw:
                break
        else:
            raise FormatError("pdfium cannot open it again")
        source = pdfium.PdfDocument(raw)
        try:
            source.init_forms()
        except pdfium.PdfiumError:
            pass  # the form fields' values are not drawn; the pages are
    try:
        yield source
    finally:
        with PDFIUM_LOCK:
            source.close()


def _render_page(source, index: int, dpi: float) -> tuple[tuple[float, float] | None, Image.Image | None, bool]:
    """Page ``index``'s size in points (None if pdfium cannot load it), its RGB pixels at ``dpi`` (None if
    it cannot be rendered; at most `MAX_PIXELS`, the resolution lowered to fit), and whether they are
    only black and white as drawn without anti-aliasing (then they are drawn so; else anti-aliased)."""
    with PDFIUM_LOCK:
        try:
            page = source[index]
        except Exception:  # pypdfium2's PdfiumError: a page tree entry pdfium cannot find
            return None, None, False
        try:
            size = page.get_size()
            try:
                dims = rasters.working_size(*page_pixels(*size, dpi), MAX_PIXELS)
                image = _draw(page, dims, crisp=True)
                crisp = _black_and_white(image)
                if not crisp:
                    del image  # before the second rendering: one page's pixels at a time
                    image = _draw(page, dims, crisp=False)
            except Exception:  # MemoryError, pdfium surprises: the page stays blank
                return size, None, False
        finally:
            page.close()
    return size, image, crisp


def _draw(page, size: tuple[int, int], crisp: bool) -> Image.Image:
    """The page in RGB at ``size`` pixels (annotations and filled form fields drawn, white background);
    ``crisp``: without anti-aliasing. Hold `PDFIUM_LOCK`."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    w, h = size
    flags = pdfium_c.FPDF_ANNOT | pdfium_c.FPDF_REVERSE_BYTE_ORDER
    if crisp:
        flags |= (pdfium_c.FPDF_RENDER_NO_SMOOTHTEXT | pdfium_c.FPDF_RENDER_NO_SMOOTHIMAGE
                  | pdfium_c.FPDF_RENDER_NO_SMOOTHPATH)
    bitmap = pdfium.PdfBitmap.new_native(w, h, pdfium_c.FPDFBitmap_BGR, rev_byteorder=True)
    try:
        bitmap.fill_rect((255, 255, 255, 255), 0, 0, w, h)
        args = (bitmap, page, 0, 0, w, h, 0, flags)
        pdfium_c.FPDF_RenderPageBitmap(*args)
        if page.formenv:
            pdfium_c.FPDF_FFLDraw(page.formenv, *args)
        return bitmap.to_pil()  # a copy (Pillow has no RGB view of 3-byte pixels)
    finally:
        bitmap.close()


def _black_and_white(image: Image.Image) -> bool:
    """True for pixels that are all black or white. Drawn without anti-aliasing, a page of black text and
    lines on white is, and 1 bit a pixel stores it losslessly: a letter page of text at 200 dpi takes
    ~60 kB so, against ~900 kB as a quality-90 JPEG of its anti-aliased rendering."""
    colors = image.getcolors(2)  # None as soon as there are more than two
    return colors is not None and all(color in ((0, 0, 0), (255, 255, 255)) for _, color in colors)


def _page_image(pdf, image: Image.Image, crisp: bool):
    """A page's RGB pixels as an image XObject: 1 bit a pixel (Flate) where ``crisp`` (only black and
    white), else a quality-90 JPEG, grey where the three channels agree."""
    from pikepdf import Name

    if crisp:
        bits = image.convert("1", dither=Image.Dither.NONE)
        return _flate_image(pdf, bits.tobytes(), bits.size, "1", 1)
    red, green, blue = image.split()
    if ImageChops.difference(red, green).getbbox() is None and ImageChops.difference(green, blue).getbbox() is None:
        image = red
    del red, green, blue
    data = io.BytesIO()
    image.save(data, format="JPEG", quality=_JPEG_QUALITY, optimize=True)
    stream = pdf.make_stream(data.getvalue(), Filter=Name.DCTDecode)
    _describe(stream, image.size, image.mode, 8)
    return stream
