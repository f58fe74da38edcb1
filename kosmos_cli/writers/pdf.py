"""Searchable PDF of an OCR document: the input's own pages with the OCR lines as invisible text.

- **PDF input.** The input file, its pages, content, fonts, annotations, forms, outline and metadata
  as they are, plus on each page that has OCR lines a text layer drawn after the page's content
  (which is wrapped in ``q``/``Q`` so that the layer starts from the default graphics state). Pages
  not selected, failed, or without lines are not touched. An encrypted input is written decrypted.
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
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .. import rasters
from ..documents import MAX_PIXELS, DocumentError, open_document, password_candidates
from ..results import PageResult
from ..tasks import Task
from .glyphless import ADVANCE, ASCENT, DESCENT, FONT_NAME, UNITS, Encoding, cid_to_gid_map, truetype_font

__all__ = ["DEFAULT_IMAGE_DPI", "FormatError", "Original", "searchable_pdf"]

DEFAULT_IMAGE_DPI = 300.0  # an image without a sensible DPI is taken as a 300-dpi scan
_MAX_PAGE_POINTS = 14400.0  # the largest page PDF readers accept (200 inches): larger images get more DPI
_FONT_RESOURCE = "KosmosOCR"

Matrix = tuple[float, float, float, float, float, float]


@dataclass(frozen=True)
class Original:
    """The input file a document's files are made from, and its --password."""

    path: Path
    password: str | None = None


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
        try:
            if doc.kind == "pdf":
                pdf = _open_pdf(original)
                maps = {n: doc.pixel_to_page(n - 1, (r.width, r.height)) for n, r in by_page.items()}
            else:
                pdf = pikepdf.new()
                sizes = {n: _add_image_page(pdf, original.path, n - 1) for n in range(1, doc.num_pages + 1)}
                # The page's points over the result's pixels (the image's size as displayed).
                maps = {n: (sizes[n][0] / r.width, 0.0, 0.0, -sizes[n][1] / r.height, 0.0, sizes[n][1])
                        for n, r in by_page.items()}
            font = _add_font(pdf, encoding) if by_page else None
            for n, result in by_page.items():
                _add_text_layer(pdf, pdf.pages[n - 1], font, encoding, result, maps[n])
            out = io.BytesIO()
            pdf.save(out, encryption=False, deterministic_id=True)
        except rasters.Unreadable as err:
            raise FormatError(err.reason) from None
        except pikepdf.PdfError as err:
            raise FormatError(f"cannot write this PDF ({err})") from None
    return out.getvalue()


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
            raise FormatError(f"pikepdf cannot read this PDF ({err})") from None
    raise FormatError("pikepdf cannot decrypt this PDF with the password given")


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
    from pikepdf import Array, Dictionary, Name, Page

    with rasters.open_frame(path, index, MAX_PIXELS) as (im, orientation):
        image = _image_xobject(pdf, im, path)
        (w, h), (dx, dy) = im.size, _dpi(im)
    orientation = orientation if orientation in _ORIENTED else 1
    width_in, height_in = w / dx, h / dy
    if orientation >= 5:  # a quarter turn: the displayed page is the stored one on its side
        w, h, width_in, height_in = h, w, height_in, width_in
    shrink = min(1.0, _MAX_PAGE_POINTS / (72 * max(width_in, height_in)))
    pw, ph = 72 * width_in * shrink, 72 * height_in * shrink
    a, b, c, d, e, f = _ORIENTED[orientation]
    draw = f"q {' '.join(_number(v) for v in (a * pw, b * ph, c * pw, d * ph, e * pw, f * ph))} cm /Im0 Do Q\n"
    page = Dictionary(
        Type=Name.Page, MediaBox=Array([0, 0, round(pw, 4), round(ph, 4)]),
        Resources=Dictionary(XObject=Dictionary(Im0=image)), Contents=pdf.make_stream(draw.encode()),
    )
    pdf.pages.append(Page(page))
    return pw, ph


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

