"""Documents: PDFs and images opened lazily, their pages rendered as bounded working images.

    with open_document("scan.pdf", dpi=200) as doc:   # or a PNG, JPEG, TIFF, WebP, BMP, GIF
        page = doc.page(0)  ->  RenderedPage(image, size, notes)

`open_document` opens lazily: it reads only what is needed for ``num_pages``. `Document.page(i)`
renders one page (0-based index) as a `RenderedPage`: its full pixel ``size`` and a *working image*,
RGB, that size scaled down (aspect ratio kept, never up) to at most `WORK_PIXELS` pixels, since the
models read ~1 MP whatever the page size. Results' coordinates are meant for ``size``; the working
image is what the models (and overlays) see. PDFs are rendered by pypdfium2 at ``dpi`` (the full size
is the page's extent at dpi/72 pixels per point, rounded up, see `page_pixels`; pdfium renders the
working size directly; annotations and filled form fields drawn, white background). Images are read
by Pillow (every TIFF frame is a page; GIF, animated WebP and MPO contribute their first frame only:
animation frames are not pages); how their pixels become the working image (bit depth, alpha, EXIF
orientation, libtiff's messages as the page's ``notes``) is `kosmos_cli.rasters`.
What the libraries say while a PDF opens (pypdfium2's warning for an XFA form, which its build cannot
draw) is the document's ``notes``, in our words, and not printed: see `_pdfium_messages`.
Every failure is one exception type, `DocumentError(path, reason, page=None)`: unreadable, empty,
corrupt or truncated file, not a regular file, unsupported type, encrypted PDF without or with a
wrong password (AES-256 passwords are also tried SASLprep'd, as PDF 2.0 says), images or pages over
`MAX_PIXELS` (decompression bombs included; the limit admits large legitimate scans). A page's reason
does not name the page (the page job carries it; ``str()`` of the exception does).

A document counts the renders still owed on it: `claim(n)` adds n, `release()` takes one back, and
the release that brings the count to zero closes it (`kosmos_cli.pages` claims one per page job).
`close` may also be called at any time; it is idempotent and thread-safe.

Threads
-------
PDFium is not thread-safe: no two pdfium calls may run at the same time, even on different
documents. Every pdfium call in this module (open, page count, render, close) holds the one
module-level `PDFIUM_LOCK`; other modules that call pypdfium2 must take it too. A document dropped
without `close` while another thread holds the lock is closed by the next pdfium call here, so a
finalizer never waits. Image pages reopen their file on every call and are safe to render from any
thread (TIFF decodes are serialised while fd 2 is captured for libtiff's messages).
"""

from __future__ import annotations

import logging
import math
import os
import stat
import stringprep
import threading
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from . import rasters
from .inputs import SUPPORTED_EXTENSIONS, unsupported_type
from .paths import not_regular, os_reason

__all__ = [
    "DEFAULT_DPI",
    "DYNAMIC_XFA_NOT_DRAWN",
    "MAX_PIXELS",
    "PDFIUM_LOCK",
    "WORK_PIXELS",
    "XFA_NOT_DRAWN",
    "Document",
    "DocumentError",
    "RenderedPage",
    "open_document",
    "page_pixels",
]

# Kosmos-2.5 resizes every page to a grid of at most 4096 16×16 patches, i.e. ~1 MP whatever the input
# size: a US-letter page becomes 56×72 patches = 896×1152 px (the grid depends on the aspect ratio only).
# 200 dpi renders letter at 1700×2200 (the size in DESIGN.md's example), ~1.9× the grid per side, so
# the model's antialiased bilinear downscale averages ~2×2 rendered pixels per input pixel: glyph edges
# stay smooth and 6 pt text is still ~17 px tall before the resize. 150 dpi (1.4×) would also work but
# leaves less headroom; 300 dpi (8.4 MP, 25 MB a page) costs 2.2× the render time and memory for no
# visible gain at the model's resolution. Polygons are reported in these pixels, which is also ample
# for overlays.
DEFAULT_DPI = 200

# The working image's pixel budget: 4× the model's 4096-patch grid (4 × 4096 × 16² = 4.19 MP), i.e. 2×
# the grid per side, the antialiasing headroom argued for DEFAULT_DPI above. It keeps the default
# renders at full size (letter at 200 dpi is 3.74 MP, A4 3.87 MP), so default outputs do not change,
# and bounds a page to ~17 MB as a Pillow RGB image (4 bytes a pixel) however large the scan or the
# --dpi: a letter page at 1200 dpi (135 MP) would otherwise take 540 MB, and its preprocessing 4 GB.
WORK_PIXELS = 4 * 4096 * 16 * 16

# Largest page, in pixels, that we decode or render (~900 MB as RGB). Admits 300 dpi scans of A0 posters
# (9933×14043 = 139 MP) and 200 dpi renders of 85×85 inch pages; refuses decompression bombs and PDFs
# with absurd page boxes before any memory is allocated.
MAX_PIXELS = 300_000_000

# One lock for every pdfium call in the process (pdfium keeps global state and is not thread-safe).
PDFIUM_LOCK = threading.RLock()

# The note of a PDF with an XFA form, whose XFA layer this pdfium build cannot draw (pypdfium2's wheels
# are built without XFA). A foreground XFA form also carries the static pages and AcroForm fields that
# other viewers show (drawn); a dynamic ("full") one carries only placeholder pages.
XFA_NOT_DRAWN = "XFA form content is not drawn; the static fallback is"
DYNAMIC_XFA_NOT_DRAWN = "dynamic XFA form: its content is not drawn, only the placeholder pages the PDF carries"


class DocumentError(Exception):
    """A document (or one of its pages) cannot be read.

    ``reason`` never names the page; ``page`` (1-based) is set for a page failure, and ``str()`` is
    ``"<path>: <reason>"`` or ``"<path>: page <page>: <reason>"``.
    """

    def __init__(self, path: str | os.PathLike, reason: str, page: int | None = None):
        super().__init__(f"{path}: {reason}" if page is None else f"{path}: page {page}: {reason}")
        self.path = str(path)
        self.reason = reason
        self.page = page


def page_pixels(width_pt: float, height_pt: float, dpi: float) -> tuple[int, int]:
    """A page's full pixel size at ``dpi``: its extent at dpi/72 pixels per point, rounded up.

    Floating-point noise is not a pixel: 792 pt at 300 dpi computes as 3300.0000000000005, and pdfium
    gives page boxes as float32, so an excess under 1e-7 of the size is dropped (pypdfium2's own
    ``render`` rounds the noise up and renders 3301 px).
    """

    def pixels(points: float) -> int:
        exact = points * dpi / 72
        return max(1, math.ceil(exact - exact * 1e-7))

    return pixels(width_pt), pixels(height_pt)


@dataclass(frozen=True)
class RenderedPage:
    """One rendered page: the working ``image`` (RGB, at most `WORK_PIXELS`) and the page's full pixel
    ``size`` (the size results' coordinates refer to); ``notes`` are decoder warnings worth reporting."""

    image: Image.Image
    size: tuple[int, int]
    notes: tuple[str, ...] = ()


# PDF handles whose Document was dropped while another thread held PDFIUM_LOCK: closed by the next
# holder of the lock (see Document.__del__).
_ORPHANS: list = []


def _close_orphans() -> None:
    """Close the handles finalizers left behind; call with PDFIUM_LOCK held."""
    while _ORPHANS:
        _ORPHANS.pop().close()


class Document:
    """An opened PDF or image file. ``page(i)`` (0-based) renders one page at a time.

    Close it (or use ``with``) to release the PDF handle; closing is idempotent and thread-safe.
    Or `claim` the renders owed on it and `release` each: the last release closes it.
    """

    def __init__(self, source: Path, kind: str, num_pages: int, dpi: float, max_pixels: int, pdf=None, fmt: str = "",
                 notes: tuple[str, ...] = ()):
        self.source = source
        self.kind = kind  # "pdf" or "image"
        self.num_pages = num_pages
        self.dpi = dpi
        self.max_pixels = max_pixels
        self.format = fmt
        self.notes = notes  # about the whole document (an XFA form not drawn), worth reporting once
        self._pdf = pdf
        self._closed = False
        self._claims = 0  # renders owed (see claim); guarded by _claims_lock
        self._claims_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Document({str(self.source)!r}, kind={self.kind!r}, num_pages={self.num_pages})"

    def __enter__(self) -> Document:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # Close under the lock, not from pypdfium2's own finalizer on a random thread. A finalizer must
        # neither wait (a render elsewhere may hold the lock for seconds) nor raise (a Ctrl-C landing here
        # would be printed as "Exception ignored"): if the lock is busy, the next holder closes the handle.
        try:
            if self._pdf is not None:
                _ORPHANS.append(self._pdf)
                self._pdf = None
                if PDFIUM_LOCK.acquire(blocking=False):
                    try:
                        _close_orphans()
                    finally:
                        PDFIUM_LOCK.release()
        except BaseException:  # nothing a finalizer could do with it
            pass

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with PDFIUM_LOCK:
            _close_orphans()
            if self._closed:
                return
            self._closed = True
            if self._pdf is not None:
                self._pdf.close()
                self._pdf = None

    def claim(self, n: int = 1) -> None:
        """Owe ``n`` more renders; each is given back by one `release`."""
        with self._claims_lock:
            self._claims += n

    def release(self) -> None:
        """Give back one claimed render; the release that leaves none owed closes the document."""
        with self._claims_lock:
            self._claims -= 1
            last = self._claims <= 0
        if last:
            self.close()

    def page(self, index: int) -> RenderedPage:
        """Render page ``index`` (0-based): its working image and full size; raises DocumentError."""
        if not 0 <= index < self.num_pages:
            raise IndexError(f"page index {index} out of range for {self.num_pages} pages")
        if self.kind == "pdf":
            return self._render_pdf(index)
        return self._read_image(index)

    def _render_pdf(self, index: int) -> RenderedPage:
        import pypdfium2 as pdfium
        import pypdfium2.raw as pdfium_c

        with PDFIUM_LOCK:
            _close_orphans()
            if self._closed:
                raise DocumentError(self.source, "document is closed", index + 1)
            try:
                page = self._pdf[index]
            except Exception as exc:
                raise DocumentError(self.source, f"cannot load page ({exc})", index + 1) from None
            try:
                w_pt, h_pt = page.get_size()
                size = page_pixels(w_pt, h_pt, self.dpi)
                if size[0] * size[1] > self.max_pixels:
                    raise DocumentError(
                        self.source,
                        f"{size[0]}×{size[1]} = {size[0] * size[1]:,} pixels at {self.dpi:g} dpi exceeds the limit of "
                        f"{self.max_pixels:,} (page is {w_pt / 72:.0f}×{h_pt / 72:.0f} in); use a lower --dpi",
                        index + 1,
                    )
                w, h = rasters.working_size(*size, WORK_PIXELS)
                try:
                    # pdfium fits the page to the bitmap it is given, so the working size is rendered
                    # directly (never the full size), with the page's own rotation, annotations and forms.
                    bitmap = pdfium.PdfBitmap.new_native(w, h, pdfium_c.FPDFBitmap_BGR, rev_byteorder=True)
                    bitmap.fill_rect((255, 255, 255, 255), 0, 0, w, h)
                    args = (bitmap, page, 0, 0, w, h, 0, pdfium_c.FPDF_ANNOT | pdfium_c.FPDF_REVERSE_BYTE_ORDER)
                    pdfium_c.FPDF_RenderPageBitmap(*args)
                    if page.formenv:
                        pdfium_c.FPDF_FFLDraw(page.formenv, *args)
                except Exception as exc:
                    raise DocumentError(self.source, f"render failed ({exc})", index + 1) from None
                try:
                    image = bitmap.to_pil()  # RGB: Pillow copies it (into 4 bytes a pixel)
                finally:
                    bitmap.close()
            finally:
                page.close()
        return RenderedPage(image, size)

    def pixel_to_page(self, index: int, size: tuple[int, int]) -> tuple[float, float, float, float, float, float]:
        """The affine map ``(a, b, c, d, e, f)``, as a PDF matrix, from the pixels of PDF page ``index``
        rendered at ``size`` (x right, y down) to the page's user space, exactly as pdfium renders it:
        through the CropBox clipped to the MediaBox, their offsets and /Rotate."""
        import ctypes

        import pypdfium2.raw as pdfium_c

        w, h = size
        with PDFIUM_LOCK:
            _close_orphans()
            if self._closed or self.kind != "pdf":
                raise DocumentError(self.source, "no open PDF page to map", index + 1)
            page = self._pdf[index]
            try:
                corners = []
                for x, y in ((0, 0), (w, 0), (0, h)):
                    px, py = ctypes.c_double(), ctypes.c_double()
                    pdfium_c.FPDF_DeviceToPage(page.raw, 0, 0, w, h, 0, x, y, ctypes.byref(px), ctypes.byref(py))
                    corners.append((px.value, py.value))
            finally:
                page.close()
        (e, f), (x1, y1), (x2, y2) = corners
        return (x1 - e) / w, (y1 - f) / w, (x2 - e) / h, (y2 - f) / h, e, f

    def _read_image(self, index: int) -> RenderedPage:
        try:
            image, size, notes = rasters.read_frame(self.source, index, self.max_pixels, WORK_PIXELS)
        except rasters.Unreadable as exc:
            raise DocumentError(self.source, exc.reason, index + 1) from None
        return RenderedPage(image, size, notes)


def open_document(
    path: str | os.PathLike,
    dpi: float = DEFAULT_DPI,
    password: str | None = None,
    *,
    max_pixels: int = MAX_PIXELS,
) -> Document:
    """Open a PDF or image for lazy page rendering; raises DocumentError (see the module docstring).

    ``dpi`` applies to PDFs only (images keep their pixel size); ``password`` to encrypted PDFs only.
    """
    source = Path(path)
    if dpi is None or not dpi > 0:
        raise ValueError(f"dpi must be positive, got {dpi!r}")
    try:
        mode = os.stat(source).st_mode
    except OSError as exc:
        raise DocumentError(source, os_reason(exc)) from None
    if stat.S_ISDIR(mode):
        raise DocumentError(source, "is a directory")
    if why := not_regular(mode):  # opening a named pipe would wait for a writer forever
        raise DocumentError(source, why)
    try:
        with open(source, "rb") as f:
            head = f.read(1024)
    except OSError as exc:
        raise DocumentError(source, os_reason(exc)) from None
    if not head:
        raise DocumentError(source, "empty file")
    ext = source.suffix.lower()
    if ext == ".pdf" or head.lstrip().startswith(b"%PDF-"):
        return _open_pdf(source, dpi, password, max_pixels)
    if ext not in SUPPORTED_EXTENSIONS:
        raise DocumentError(source, unsupported_type(ext))
    return _open_image(source, dpi, max_pixels)


def _open_pdf(source: Path, dpi: float, password: str | None, max_pixels: int) -> Document:
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    path = os.fsencode(source) + b"\0"
    with PDFIUM_LOCK:
        _close_orphans()
        # FPDF_GetLastError is process-global and only set when a load fails, so it is read only right
        # after FPDF_LoadDocument returned no document (which always sets it); a page-less PDF loads
        # and is told by its page count, never by a code left over from an earlier file.
        raw = code = None
        for pw in [None] if password is None else password_candidates(password):
            raw = pdfium_c.FPDF_LoadDocument(path, None if pw is None else pw + b"\0")
            if raw:
                break
            code = pdfium_c.FPDF_GetLastError()
            if code != pdfium_c.FPDF_ERR_PASSWORD:
                break
        if not raw:
            raise DocumentError(source, _pdf_failure(code, password))
        pdf = pdfium.PdfDocument(raw)
        formtype = pdf.get_formtype()
        with _pdfium_messages() as messages:
            try:
                pdf.init_forms()  # before any page is loaded, so that filled form fields are drawn
            except pdfium.PdfiumError:
                pass  # the form fields' values are not drawn; the page is
        notes = _form_notes(formtype, messages)
        try:
            n = len(pdf)
        except Exception as exc:
            pdf.close()
            raise DocumentError(source, f"cannot count pages ({exc})") from None
        if n < 1:
            pdf.close()
            raise DocumentError(source, "PDF has no pages (or an unreadable page tree)")
    return Document(source, "pdf", n, dpi, max_pixels, pdf=pdf, fmt="PDF", notes=notes)


class _Held(logging.Filter):
    """Takes the records logged in one thread, keeping their messages: a filter on a logger drops the
    records it refuses before any handler or parent logger sees them."""

    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if threading.get_ident() != self.thread:  # another thread's record: not ours to take
            return True
        self.messages.append(record.getMessage())
        return False


@contextmanager
def _pdfium_messages() -> Iterator[list[str]]:
    """What pypdfium2 logs during the block, in this thread, collected instead of printed.

    pypdfium2 warns through its module's logger (an XFA form its build cannot draw, and how to rebuild
    it), which a process that configured no logging prints raw on stderr through Python's last-resort
    handler: once per open, so once more in every worker that renders the document. The filter is on
    that one logger, for this thread and this block only (held under PDFIUM_LOCK, as the call it wraps);
    its level, its handlers and the root logger are untouched, and other threads' records pass."""
    import pypdfium2 as pdfium

    logger = logging.getLogger(pdfium.PdfDocument.init_forms.__module__)
    held = _Held()
    logger.addFilter(held)
    try:
        yield held.messages
    finally:
        logger.removeFilter(held)


def _form_notes(formtype: int, messages: list[str]) -> tuple[str, ...]:
    """The notes of a PDF from its form type and what pypdfium2 said while its forms were set up."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    xfa = formtype in (pdfium_c.FORMTYPE_XFA_FULL, pdfium_c.FORMTYPE_XFA_FOREGROUND)
    draws_xfa = "XFA" in getattr(getattr(pdfium, "PDFIUM_INFO", None), "flags", ())
    if xfa and (messages or not draws_xfa):  # not drawn: no XFA in this build, or its XFA load failed
        return (DYNAMIC_XFA_NOT_DRAWN if formtype == pdfium_c.FORMTYPE_XFA_FULL else XFA_NOT_DRAWN,)
    return tuple(f"pdfium: {message.splitlines()[0]}" for message in messages if message.strip())


def _pdf_failure(code: int, password: str | None) -> str:
    """The reason for a failed FPDF_LoadDocument, from its error code."""
    import pypdfium2.raw as pdfium_c

    if code == pdfium_c.FPDF_ERR_PASSWORD:
        if password:
            return "PDF is encrypted and the password is wrong (--password)"
        return "PDF is encrypted; pass --password"
    if code == pdfium_c.FPDF_ERR_SECURITY:
        return "PDF uses an unsupported security handler"
    if code == pdfium_c.FPDF_ERR_FILE:
        return "cannot open file"
    return "not a PDF, or a corrupt or truncated one"


def password_candidates(password: str) -> list[bytes | None]:
    """Passwords to try, in order: as given; SASLprep'd when that differs (PDF 2.0 processes AES-256
    passwords so, then keeps 127 bytes); none, since a PDF with only an owner password opens without
    one and one --password for a batch must not break it."""
    given = password.encode("utf-8", "surrogateescape")
    tries: list[bytes | None] = [given]
    prepared = _saslprep(password)
    if prepared is not None and prepared.encode()[:127] != given:
        tries.append(prepared.encode()[:127])
    tries.append(None)
    return tries


_PROHIBITED = (
    stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3, stringprep.in_table_c4,
    stringprep.in_table_c5, stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
    stringprep.in_table_c9,
)


def _saslprep(text: str) -> str | None:
    """``text`` prepared by SASLprep (RFC 4013, as a query: unassigned code points allowed), or None
    when it holds a prohibited character or breaks the bidi rule, so that no password can match it."""
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c))
    prepared = unicodedata.normalize("NFKC", mapped)
    if any(prohibited(c) for c in prepared for prohibited in _PROHIBITED):
        return None
    if any(stringprep.in_table_d1(c) for c in prepared):  # right-to-left text (RFC 3454, section 6)
        if any(stringprep.in_table_d2(c) for c in prepared):
            return None
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            return None
    return prepared


def _open_image(source: Path, dpi: float, max_pixels: int) -> Document:
    try:
        n, fmt = rasters.frame_count(source, max_pixels)
    except rasters.Unreadable as exc:
        raise DocumentError(source, exc.reason) from None
    return Document(source, "image", n, dpi, max_pixels, fmt=fmt)
