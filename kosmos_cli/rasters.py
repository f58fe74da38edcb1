"""Image files read as working images: Pillow's size guard, bit depth, alpha, EXIF, libtiff's messages.

    frame_count(path, max_pixels)  ->  (frames that are pages, format)
    read_frame(path, index, max_pixels, work_pixels)  ->  (8-bit RGB working image, full size, notes)
    open_frame(path, index, max_pixels)  ->  (the frame as stored, its EXIF orientation), for copying

Failures raise `Unreadable(reason)`; `kosmos_cli.documents` names the file and page.

Pixels
------
This is the one rule for how an image *file* becomes the RGB image the models see (the CLI and
`documents.open_document` read files only through here). Every TIFF frame is a page; GIF, animated
WebP and MPO give their first frame. The frame is reduced while still in its own mode (JPEGs decoded
at 1/2 to 1/8 scale by libjpeg) to at most ``work_pixels``, then:
- 16-bit and float samples are *scaled* into 0..255, by the image's own range: 16-bit ones by
  255/65535 (kept as they are when none passes 255), float ones in 0..1 by 255 (kept up to 255),
  anything larger by 255/max; so a 16-bit scan or a float TIFF reads as the same picture in 8 bits;
- alpha (an alpha band, premultiplied RGBa included, or a palette's or tRNS transparency) is
  composited on white;
- the EXIF orientation is applied (any format that carries it, JPEG and TIFF in practice);
- everything else goes through Pillow's own conversion ("1" to 0/255, CMYK, YCbCr, ...).
An image handed to the engine in memory is converted by `processing.images.to_rgb` instead, as
transformers converts it, so that the engine's input equals the oracle's for the same PIL image. The
two agree on every 8-bit image, the pages read here included, but `to_rgb` *clips* deeper samples (a
full-range 16-bit scan comes out almost white): to give the engine the pixels the CLI gives it for a
file, read the file with `documents.open_document`.

Pillow's size guard
-------------------
Pillow's decompression-bomb guard is one process-wide setting, ``PIL.Image.MAX_IMAGE_PIXELS``, read
by every open, TIFF load and crop, with no per-call limit: Pillow warns above it and refuses above
twice it (89/179 MP by default). We refuse images over our own per-call limit (``max_pixels``) with a
clear reason before decoding, but a 240 MP poster scan under that limit must still be readable, and
the only way to let Pillow read it is that setting. So `frame_count` raises it to the limit asked
for: only ever raised (never lowered, never set when a caller set it to None), under a lock, when a
document is opened, never while a page renders. No warning filter is set: Pillow's warning for an
image between the limit and twice it, which we refuse, reaches the caller (the `kosmos` command,
which owns its process, filters it, since our error already says so).
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .paths import os_reason

__all__ = ["Unreadable", "eight_bit", "frame_count", "open_frame", "read_frame", "working_size"]

_MULTI_FRAME_FORMATS = frozenset({"TIFF"})  # formats whose frames are pages
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
_GUARD_LOCK = threading.Lock()


class Unreadable(Exception):
    """An image file, or one of its frames, cannot be read; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _allow_pixels(limit: int) -> None:
    """Raise Pillow's process-wide guard so that it admits images of ``limit`` pixels (see the module
    docstring); Pillow then warns above ``limit`` and refuses above twice it."""
    with _GUARD_LOCK:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and current < limit:
            Image.MAX_IMAGE_PIXELS = limit


def working_size(width: int, height: int, limit: int) -> tuple[int, int]:
    """``width``×``height`` scaled down, aspect ratio kept, to at most ``limit`` pixels (never up)."""
    if width * height <= limit:
        return width, height
    scale = math.sqrt(limit / (width * height))
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    if w * h > limit:  # a sliver: one side clamped at one pixel, the other takes the whole budget
        w, h = (w, limit // w) if w < h else (limit // h, h)
    return w, h


def frame_count(path: Path, max_pixels: int) -> tuple[int, str]:
    """The number of frames of the image file that are pages, and its Pillow format; reads the header only."""
    _allow_pixels(max_pixels)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise Unreadable(_too_big(w, h, max_pixels))
            fmt = im.format or ""
            return (getattr(im, "n_frames", 1) if fmt in _MULTI_FRAME_FORMATS else 1), fmt
    except UnidentifiedImageError:
        raise Unreadable("not a supported image, or a corrupt one") from None
    except _READ_ERRORS as exc:
        raise _unreadable(exc, max_pixels) from None


def read_frame(
    path: Path, index: int, max_pixels: int, work_pixels: int
) -> tuple[Image.Image, tuple[int, int], tuple[str, ...]]:
    """Frame ``index`` (0-based) as ``(image, size, notes)``: the RGB working image of at most
    ``work_pixels`` (see the module docstring), the frame's full size as displayed, libtiff's warnings."""
    messages: list[str] = []  # libtiff's, for TIFFs
    try:
        with Image.open(path) as im:
            if index:
                im.seek(index)
            w, h = im.size
            if w * h > max_pixels:
                raise Unreadable(_too_big(w, h, max_pixels))
            target = working_size(w, h, work_pixels)
            if target != (w, h):
                im.draft(None, target)  # JPEG: libjpeg decodes at 1/2..1/8 scale, still ≥ target
            if im.format == "TIFF":
                with _libtiff_messages(messages):
                    im.load()
            else:
                im.load()
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            image = _reduce(im, target)
    except _READ_ERRORS as exc:
        raise _unreadable(exc, max_pixels, f"; libtiff: {messages[-1]}" if messages else "") from None
    # Closing the file freed the decoded pixels: finish on the reduced copy alone.
    if image.size != target:
        image = image.resize(target, Image.Resampling.LANCZOS)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if orientation in _ORIENTATION_FIX:
        image = image.transpose(_ORIENTATION_FIX[orientation])
    size = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return image, size, (_libtiff_note(messages),) if messages else ()


@contextmanager
def open_frame(path: Path, index: int, max_pixels: int) -> Iterator[tuple[Image.Image, int]]:
    """Frame ``index`` (0-based) decoded at full size in its own mode, and its EXIF orientation (1-8),
    for writers that copy an image (the searchable PDF); raises `Unreadable`."""
    _allow_pixels(max_pixels)
    im = None
    try:
        im = Image.open(path)
        if index:
            im.seek(index)
        if im.width * im.height > max_pixels:
            raise Unreadable(_too_big(im.width, im.height, max_pixels))
        im.load()
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except BaseException as exc:  # not around the yield: the caller's own errors are not the file's
        if im is not None:
            im.close()
        if isinstance(exc, _READ_ERRORS):
            raise _unreadable(exc, max_pixels) from None
        raise
    with im:
        yield im, orientation


def eight_bit(im: Image.Image) -> Image.Image:
    """``im`` as the 8-bit L or RGB image the model reads (the pixel rule of the module docstring,
    before the EXIF orientation)."""
    return _to_8bit(im, _depth_scale(im))


def _too_big(w: int, h: int, limit: int) -> str:
    return f"image is {w}×{h} = {w * h:,} pixels, over the limit of {limit:,} (possible decompression bomb)"


def _bomb(exc: Exception, limit: int) -> str:
    """Pillow refused an image before we saw its size: restate its pixel count in our terms."""
    m = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(m.group(1)):,} pixels" if m else "too many pixels"
    return f"image is {size}, over the limit of {limit:,} (possible decompression bomb)"


# What Pillow raises for a file it cannot read (besides our own Unreadable).
_READ_ERRORS = (Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError)


def _unreadable(exc: BaseException, limit: int, detail: str = "") -> Unreadable:
    """Our reason for one of `_READ_ERRORS`: a bomb in our terms, an OS error in its words, else what
    the decoder said (``detail`` appended)."""
    if isinstance(exc, Image.DecompressionBombError):
        return Unreadable(_bomb(exc, limit))
    if isinstance(exc, OSError) and exc.errno is not None:
        return Unreadable(os_reason(exc))
    return Unreadable(f"corrupt or truncated image ({str(exc) or type(exc).__name__}{detail})")


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

