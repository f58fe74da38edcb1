"""Images built at test time: solid pages, seeded noise, and broken files (a decompression-bomb
stand-in PNG, a fax TIFF that libtiff complains about, a TIFF tag that Pillow warns about)."""

from __future__ import annotations

import functools

import random
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageDraw


def write_image(path: Path, size: tuple[int, int] = (64, 48), color="white") -> Path:
    """Save a solid RGB image of `size` at `path` (format from the suffix), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


# The documents tests' picture: 40×30, red.
make_image = functools.partial(write_image, size=(40, 30), color=(200, 30, 30))


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """A width×height RGB image of uniform random pixels, the same for the same seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width``×``height`` but holds one empty IDAT: a decompression-bomb stand-in."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    Path(path).write_bytes(data)
    return Path(path)


def make_corrupt_g4_tiff(path: Path, *, unreadable: bool = False) -> Path:
    """A CCITT Group 4 TIFF (400×300, lines of text) with 40 garbage bytes in its strip: libtiff decodes
    it, writing warnings ("Fax4Decode: Bad code word ...") to the C stderr. ``unreadable`` also makes
    the strip's byte count run past the end of the file, so that the decode fails."""
    im = Image.new("1", (400, 300), 1)
    draw = ImageDraw.Draw(im)
    for y in range(10, 290, 12):
        draw.text((10, y), "The quick brown fox jumps over the lazy dog 0123456789", fill=0)
    im.save(path, compression="group4")
    with Image.open(path) as tif:
        offset, count = tif.tag_v2[273][0], tif.tag_v2[279][0]  # StripOffsets, StripByteCounts
    data = bytearray(Path(path).read_bytes())
    rng = random.Random(0)
    for i in range(offset + count // 4, offset + count // 4 + 40):
        data[i] = rng.randrange(256)
    if unreadable:  # Pillow writes little-endian TIFFs with LONG byte counts
        ifd = struct.unpack_from("<I", data, 4)[0]
        for k in range(struct.unpack_from("<H", data, ifd)[0]):
            entry = ifd + 2 + 12 * k
            if struct.unpack_from("<H", data, entry)[0] == 279:
                struct.pack_into("<I", data, entry + 8, count * 50)
    Path(path).write_bytes(bytes(data))
    return Path(path)


def make_odd_tag_tiff(path: Path) -> Path:
    """A 64×48 white TIFF whose XResolution tag (282) says it holds two values where TIFF has one:
    Pillow reads it anyway, with a warning ("Metadata Warning, tag 282 had too many entries")."""
    Image.new("RGB", (64, 48), "white").save(path, dpi=(72, 72))
    data = bytearray(Path(path).read_bytes())
    assert data[:2] == b"II"  # Pillow writes little-endian TIFF
    (ifd,) = struct.unpack_from("<I", data, 4)
    (entries,) = struct.unpack_from("<H", data, ifd)
    for k in range(entries):
        at = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, at)[0] == 282:
            struct.pack_into("<I", data, at + 4, 2)  # the entry's count; its second value is the YResolution's
    Path(path).write_bytes(bytes(data))
    return Path(path)
