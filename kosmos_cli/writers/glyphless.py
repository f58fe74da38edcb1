"""An invisible font for a PDF text layer: one empty glyph for every character, the text kept by a
ToUnicode map (the approach of Tesseract's and OCRmyPDF's searchable PDFs).

A Type0 font with Identity-H encoding reads each character code as two bytes, a CID. We choose the
CID of a character in the Basic Multilingual Plane to be its code point, so the ToUnicode map is one
identity range a high byte (``<4E00> <4EFF> <4E00>``). CIDs in the surrogate block (U+D800–DFFF),
which text never holds, name the characters beyond the BMP that a document uses (emoji, rare CJK),
up to 2,048 of them; any more become U+FFFD. Every CID draws glyph 1, whose outline encloses no
area, so the text is never painted whatever the render mode; the embedded TrueType file is about
550 bytes.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable

__all__ = ["FONT_NAME", "UNITS", "ASCENT", "DESCENT", "ADVANCE", "Encoding", "cid_to_gid_map", "truetype_font"]

FONT_NAME = "KosmosGlyphless"
UNITS = 1000  # font units per em, as PDF widths count them
ASCENT, DESCENT = 800, -200  # the em box from the baseline: 0.8 em above, 0.2 em below
ADVANCE = 500  # every glyph's advance width, in font units

_SURROGATES = range(0xD800, 0xE000)
_REPLACEMENT = 0xFFFD


class Encoding:
    """The CIDs of one document's text: ``Encoding(texts)`` sees every text first (the characters
    beyond the BMP get their CIDs then), `encode` gives a text's two-byte codes, `to_unicode` the
    CMap stream that maps them back."""

    def __init__(self, texts: Iterable[str]):
        self.astral: dict[str, int] = {}
        for text in texts:
            for ch in text:
                if ord(ch) > 0xFFFF and ch not in self.astral and len(self.astral) < len(_SURROGATES):
                    self.astral[ch] = _SURROGATES[len(self.astral)]

    def cids(self, text: str) -> list[int]:
        out = []
        for ch in text:
            cp = ord(ch)
            if cp > 0xFFFF:
                out.append(self.astral.get(ch, _REPLACEMENT))
            else:
                out.append(_REPLACEMENT if cp in _SURROGATES else cp)
        return out

    def encode(self, text: str) -> bytes:
        return b"".join(cid.to_bytes(2, "big") for cid in self.cids(text))

    def to_unicode(self) -> bytes:
        """The ToUnicode CMap (PDF 1.7, 9.10.3): identity ranges outside the surrogate block, then the
        astral characters one by one. At most 100 entries a block, as the CMap syntax allows."""
        ranges = [f"<{hi:02X}00> <{hi:02X}FF> <{hi:02X}00>" for hi in range(256) if not 0xD8 <= hi <= 0xDF]
        chars = [f"<{cid:04X}> <{ch.encode('utf-16-be').hex().upper()}>" for ch, cid in self.astral.items()]
        body = [
            "/CIDInit /ProcSet findresource begin",
            "12 dict begin",
            "begincmap",
            "/CIDSystemInfo << /Registry (Adobe) /Ordering (UCS) /Supplement 0 >> def",
            "/CMapName /Adobe-Identity-UCS def",
            "/CMapType 2 def",
            "1 begincodespacerange",
            "<0000> <FFFF>",
            "endcodespacerange",
        ]
        for start in range(0, len(ranges), 100):
            block = ranges[start:start + 100]
            body += [f"{len(block)} beginbfrange", *block, "endbfrange"]
        for start in range(0, len(chars), 100):
            block = chars[start:start + 100]
            body += [f"{len(block)} beginbfchar", *block, "endbfchar"]
        body += ["endcmap", "CMapName currentdict /CMap defineresource pop", "end", "end"]
        return ("\n".join(body) + "\n").encode("ascii")


def cid_to_gid_map() -> bytes:
    """The CIDToGIDMap stream's data: every CID → glyph 1 (two bytes a CID, compressed to ~300 bytes)."""
    return zlib.compress(b"\x00\x01" * 0x10000, 9)


# Glyph 1: one contour of two points, the diagonal of the em box. It encloses nothing, so nothing is
# ever filled, but it gives the glyph the em box as its bounds: pdfium measures a character by its
# glyph's bounds, and drops characters without any from text extraction when the line is rotated.
_GLYPH = (struct.pack(">hhhhh", 1, 0, DESCENT, ADVANCE, ASCENT) + struct.pack(">HH", 1, 0)  # end point 1, no code
          + bytes([1, 1]) + struct.pack(">hhhh", 0, ADVANCE, DESCENT, ASCENT - DESCENT))  # on-curve; x, y deltas


def truetype_font() -> bytes:
    """A TrueType file with two glyphs, both ``ADVANCE`` wide: an empty .notdef and glyph 1, which
    has an outline that encloses nothing."""
    tables = {
        b"cmap": struct.pack(">HHHHI", 0, 1, 3, 1, 12)  # one Windows Unicode subtable that maps nothing:
        + struct.pack(">HHHHHHHHHHHH", 4, 24, 0, 2, 2, 0, 0, 0xFFFF, 0, 0xFFFF, 1, 0),  # a format-4 end segment
        b"glyf": _GLYPH,
        b"head": struct.pack(">IIIIHHqqhhhhHHhhh", 0x00010000, 0x00010000, 0, 0x5F0F3CF5, 0b1011, UNITS, 0, 0,
                             0, DESCENT, ADVANCE, ASCENT, 0, 3, 2, 0, 0),
        b"hhea": struct.pack(">IhhhHhhhhhhhhhhhH", 0x00010000, ASCENT, DESCENT, 0, ADVANCE, 0, 0, 0, 1, 0, 0,
                             0, 0, 0, 0, 0, 2),
        b"hmtx": struct.pack(">HhHh", ADVANCE, 0, ADVANCE, 0),
        b"loca": struct.pack(">HHH", 0, 0, len(_GLYPH) // 2),  # .notdef has no data, glyph 1 all of it
        b"maxp": struct.pack(">IHHHHHHHHHHHHHH", 0x00010000, 2, 2, 1, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0),
        b"name": _name_table({1: FONT_NAME, 2: "Regular", 4: FONT_NAME, 6: FONT_NAME}),
        b"post": struct.pack(">IIhhIIIII", 0x00030000, 0, 0, 0, 1, 0, 0, 0, 0),  # version 3: no glyph names
    }
    count = len(tables)
    power = 1 << (count.bit_length() - 1)
    header = struct.pack(">IHHHH", 0x00010000, count, power * 16, power.bit_length() - 1, count * 16 - power * 16)
    directory, data = b"", b""
    offset = len(header) + 16 * count
    for tag, table in sorted(tables.items()):
        directory += struct.pack(">4sIII", tag, _checksum(table), offset + len(data), len(table))
        data += table + b"\0" * (-len(table) % 4)
    font = bytearray(header + directory + data)
    # head.checkSumAdjustment (at offset 8 of the table) makes the whole file sum to 0xB1B0AFBA.
    head_offset = struct.unpack_from(">I", directory, 16 * sorted(tables).index(b"head") + 8)[0]
    struct.pack_into(">I", font, head_offset + 8, (0xB1B0AFBA - _checksum(bytes(font))) & 0xFFFFFFFF)
    return bytes(font)


def _name_table(names: dict[int, str]) -> bytes:
    records, strings = b"", b""
    for name_id, text in names.items():
        raw = text.encode("utf-16-be")
        records += struct.pack(">HHHHHH", 3, 1, 0x409, name_id, len(raw), len(strings))
        strings += raw
    return struct.pack(">HHH", 0, len(names), 6 + len(records)) + records + strings


def _checksum(data: bytes) -> int:
    padded = data + b"\0" * (-len(data) % 4)
    return sum(struct.unpack(f">{len(padded) // 4}I", padded)) & 0xFFFFFFFF
