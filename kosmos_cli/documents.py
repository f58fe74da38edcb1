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
by Pillow, reduced while still in their own mode (JPEGs decoded at 1/2 to 1/8 scale by libjpeg): every
TIFF frame is a page; GIF, animated WebP and MPO contribute their first frame only (animation frames
are not pages); the EXIF orientation is applied (any format that carries it, JPEG and TIFF in
practice); transparency is composited on white; 16-bit and float images are scaled to 8 bits.
libtiff's warnings become the page's ``notes`` (its errors, part of the page's error).
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

import math
import os
import re
import stat
import stringprep
import sys
import tempfile
import threading
import unicodedata
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .inputs import SUPPORTED_EXTENSIONS, unsupported_type
from .paths import not_regular, os_reason

__all__ = [
    "DEFAULT_DPI",
    "MAX_PIXELS",
    "PDFIUM_LOCK",
    "WORK_PIXELS",
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

_MULTI_FRAME_FORMATS = frozenset({"TIFF"})  # formats whose frames are pages (see module docstring)

# One lock for every pdfium call in the process (pdfium keeps global state and is not thread-safe).
PDFIUM_LOCK = threading.RLock()

# Pillow's process-wide bomb guard warns above MAX_IMAGE_PIXELS and refuses above twice that (89/179 MP
# by default). We enforce our own per-call limit (`max_pixels`) with a clear DocumentError, so Pillow's
# thresholds are raised to our limit when needed (see _pillow_allow) and its warning, which would only
# duplicate our error on stderr, is silenced.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


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


# --------------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------------


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


def _working_size(width: int, height: int, limit: int = WORK_PIXELS) -> tuple[int, int]:
    """``width``×``height`` scaled down, aspect ratio kept, to at most ``limit`` pixels (never up)."""
    if width * height <= limit:
        return width, height
    scale = math.sqrt(limit / (width * height))
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    if w * h > limit:  # a sliver: one side clamped at one pixel, the other takes the whole budget
        w, h = (w, limit // w) if w < h else (limit // h, h)
    return w, h


@dataclass(frozen=True)
class RenderedPage:
    """One rendered page: the working ``image`` (RGB, at most `WORK_PIXELS`) and the page's full pixel
    ``size`` (the size results' coordinates refer to); ``notes`` are decoder warnings worth reporting."""

    image: Image.Image
    size: tuple[int, int]
    notes: tuple[str, ...] = ()


def _pillow_allow(max_pixels: int) -> None:
    """Make sure Pillow's own guard (refusal at 2 × MAX_IMAGE_PIXELS) does not undercut ``max_pixels``."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and limit < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow then warns above max_pixels, refuses above twice that


_DEEP_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
# Pixels converted at a time while reducing a big image (4 MB as RGB), whatever its mode.
_STRIP_PIXELS = 1 << 20
_EXIF_ORIENTATION = 0x0112
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _depth_scale(im: Image.Image) -> float:
    """The factor that brings a 16-bit or float image's values (by its own range) into 0..255; 1 otherwise."""
    if im.mode not in _DEEP_MODES:
        return 1.0
    hi = im.getextrema()[1]
    if im.mode == "F":
        return 255.0 if hi <= 1.0 else (1.0 if hi <= 255 else 255.0 / hi)
    return 1.0 if hi <= 255 else (255.0 / 65535 if hi <= 65535 else 255.0 / hi)


def _to_8bit(im: Image.Image, scale: float) -> Image.Image:
    """A new L (grey and bilevel) or RGB image from any Pillow mode: alpha composited on white,
    16-bit/float values × ``scale``."""
    if im.mode in _DEEP_MODES:
        im = im.convert("F") if im.mode == "F" else im.convert("I")
        return im.point(lambda v: v * scale).convert("L")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return im.convert("L" if im.mode in ("1", "L") else "RGB")


def _reduce(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A decoded image as a new 8-bit image, reduced by a whole factor to no less than ``size``.

    A big image is box-reduced strip by strip straight from its own mode, so the only full-size copy
    is the decoded one: converting a 1-bit page to RGB first would take 4× its memory, a 16-bit one 2×.
    """
    scale = _depth_scale(im)
    factor = max(1, min(im.width // size[0], im.height // size[1]))
    if factor == 1:
        return _to_8bit(im, scale)
    rows = max(1, _STRIP_PIXELS // (im.width * factor)) * factor  # whole output rows per strip
    out = None
    for top in range(0, im.height, rows):
        strip = _to_8bit(im.crop((0, top, im.width, min(im.height, top + rows))), scale).reduce(factor)
        if out is None:
            out = Image.new(strip.mode, (-(-im.width // factor), -(-im.height // factor)))
        out.paste(strip, (0, top // factor))
    return out


# libtiff reports through the C stderr, as "<Module>: <message>" lines (Fax4Decode: Bad code word ...).
_LIBTIFF_LINE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*: ")
_FD2_LOCK = threading.Lock()


@contextmanager
def _libtiff_messages(messages: list[str]) -> Iterator[None]:
    """Collect what libtiff writes to fd 2 during the block into ``messages``.

    fd 2 is process-wide, so captures are serialised and kept to one decode; lines that are not
    libtiff's (our own ``kosmos:`` lines, a progress bar from another thread) are passed on to stderr
    when the block ends.
    """
    with _FD2_LOCK, tempfile.TemporaryFile() as capture:
        try:
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):  # no usable sys.stderr: nothing buffered to keep
            pass
        try:
            saved = os.dup(2)
        except OSError:  # no fd 2 at all: nothing to capture, nor to pass on
            yield
            return
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            other = b""
            for line in capture.read().splitlines(keepends=True):
                text = line.decode(errors="replace")
                if _LIBTIFF_LINE.match(text) and not text.startswith("kosmos:"):
                    messages.append(text.strip().rstrip("."))
                else:
                    other += line
            while other:
                other = other[os.write(2, other):]


def _libtiff_note(messages: list[str]) -> str:
    more = len(messages) - 1
    return f"libtiff: {messages[0]}" + (f" (and {more} more libtiff warning{'s' * (more != 1)})" if more else "")


def _read_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return os_reason(exc)
    return str(exc) or type(exc).__name__


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

    def __init__(self, source: Path, kind: str, num_pages: int, dpi: float, max_pixels: int, pdf=None, fmt: str = ""):
        self.source = source
        self.kind = kind  # "pdf" or "image"
        self.num_pages = num_pages
        self.dpi = dpi
        self.max_pixels = max_pixels
        self.format = fmt
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
                w, h = _working_size(*size)
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

    def _read_image(self, index: int) -> RenderedPage:
        _pillow_allow(self.max_pixels)
        messages: list[str] = []  # libtiff's, for TIFFs
        try:
            with Image.open(self.source) as im:
                if index:
                    im.seek(index)
                w, h = im.size
                if w * h > self.max_pixels:
                    raise DocumentError(self.source, _too_big(w, h, self.max_pixels), index + 1)
                target = _working_size(w, h)
                if target != (w, h):
                    im.draft(None, target)  # JPEG: libjpeg decodes at 1/2..1/8 scale, still ≥ target
                if im.format == "TIFF":
                    with _libtiff_messages(messages):
                        im.load()
                else:
                    im.load()
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
                image = _reduce(im, target)
        except DocumentError:
            raise
        except Image.DecompressionBombError as exc:
            raise DocumentError(self.source, _bomb(exc, self.max_pixels), index + 1) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise DocumentError(self.source, os_reason(exc), index + 1) from None
            libtiff = f"; libtiff: {messages[-1]}" if messages else ""
            raise DocumentError(
                self.source, f"corrupt or truncated image ({_read_reason(exc)}{libtiff})", index + 1
            ) from None
        # Closing the file freed the decoded pixels: finish on the reduced copy alone.
        if image.size != target:
            image = image.resize(target, Image.Resampling.LANCZOS)
        if image.mode != "RGB":
            image = image.convert("RGB")
        if orientation in _ORIENTATION_FIX:
            image = image.transpose(_ORIENTATION_FIX[orientation])
        size = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
        return RenderedPage(image, size, (_libtiff_note(messages),) if messages else ())


def _too_big(w: int, h: int, limit: int) -> str:
    return f"image is {w}×{h} = {w * h:,} pixels, over the limit of {limit:,} (possible decompression bomb)"


def _bomb(exc: Exception, limit: int) -> str:
    """Pillow refused an image before we saw its size: restate its pixel count in our terms."""
    m = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(m.group(1)):,} pixels" if m else "too many pixels"
    return f"image is {size}, over the limit of {limit:,} (possible decompression bomb)"


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
        for pw in [None] if password is None else _password_tries(password):
            raw = pdfium_c.FPDF_LoadDocument(path, pw)
            if raw:
                break
            code = pdfium_c.FPDF_GetLastError()
            if code != pdfium_c.FPDF_ERR_PASSWORD:
                break
        if not raw:
            raise DocumentError(source, _pdf_failure(code, password))
        pdf = pdfium.PdfDocument(raw)
        try:
            pdf.init_forms()  # before any page is loaded, so that filled form fields are drawn
        except pdfium.PdfiumError:
            pass  # the form fields' values are not drawn; the page is
        try:
            n = len(pdf)
        except Exception as exc:
            pdf.close()
            raise DocumentError(source, f"cannot count pages ({exc})") from None
        if n < 1:
            pdf.close()
            raise DocumentError(source, "PDF has no pages (or an unreadable page tree)")
    return Document(source, "pdf", n, dpi, max_pixels, pdf=pdf, fmt="PDF")


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


def _password_tries(password: str) -> list[bytes | None]:
    """Passwords to try, in order: as given; SASLprep'd when that differs (PDF 2.0 processes AES-256
    passwords so, then keeps 127 bytes); none, since a PDF with only an owner password opens without
    one and one --password for a batch must not break it."""
    given = password.encode("utf-8", "surrogateescape")
    tries: list[bytes | None] = [given + b"\0"]
    prepared = _saslprep(password)
    if prepared is not None and prepared.encode()[:127] != given:
        tries.append(prepared.encode()[:127] + b"\0")
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
    _pillow_allow(max_pixels)
    try:
        with Image.open(source) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise DocumentError(source, _too_big(w, h, max_pixels))
            fmt = im.format or ""
            n = getattr(im, "n_frames", 1) if fmt in _MULTI_FRAME_FORMATS else 1
    except DocumentError:
        raise
    except Image.DecompressionBombError as exc:
        raise DocumentError(source, _bomb(exc, max_pixels)) from None
    except UnidentifiedImageError:
        raise DocumentError(source, "not a supported image, or a corrupt one") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise DocumentError(source, os_reason(exc)) from None
        raise DocumentError(source, f"corrupt or truncated image ({_read_reason(exc)})") from None
    return Document(source, "image", n, dpi, max_pixels, fmt=fmt)
