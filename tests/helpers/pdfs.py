"""PDFs built at test time, without extra packages.

`make_pdf` writes a minimal PDF by hand, optionally encrypted with the standard security handler
(revision 2, 40-bit RC4: MD5 and RC4 are a few lines of Python), which pdfium opens like any other.
`make_image_pdf` uses pypdfium2 itself to place a coloured square on every page; `make_form_pdf` writes
a page with one filled text field, `make_xfa_pdf` a page of an XFA form.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pypdfium2 as pdfium
from PIL import Image

_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def _rc4(key: bytes, data: bytes) -> bytes:
    s = list(range(256))
    j = 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    i = j = 0
    out = bytearray()
    for b in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(b ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


def _pad(pw: str) -> bytes:
    return (pw.encode("latin-1") + _PAD)[:32]


BLACK_BOX = b"0 0 0 rg 20 20 60 60 re f"  # a black 60×60 pt square at (20, 20) from the bottom left


def _write_objects(path: Path, objs: dict[int, bytes], trailer: str = "") -> Path:
    """Serialise numbered objects with an xref table; object 1 is the catalog."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for num in sorted(objs):
        offsets[num] = len(out)
        out += f"{num} 0 obj\n".encode() + objs[num] + b"\nendobj\n"
    xref = len(out)
    count = max(objs) + 1
    out += f"xref\n0 {count}\n0000000000 65535 f \n".encode()
    for num in range(1, count):
        out += f"{offsets[num]:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {count} /Root 1 0 R {trailer} >>\nstartxref\n{xref}\n%%EOF\n".encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(bytes(out))
    return Path(path)


def make_pdf(
    path: Path,
    pages: list[bytes] | int = 1,
    *,
    size: tuple[float, float] = (200, 100),
    user_password: str | None = None,
    owner_password: str = "owner",
) -> Path:
    """Write a PDF whose pages have the given content streams (or ``pages`` black-box pages).

    With ``user_password`` (may be "" for an owner-only PDF) the file is RC4-40 encrypted.
    """
    contents = [BLACK_BOX] * pages if isinstance(pages, int) else list(pages)
    file_id = b"0123456789abcdef"
    n = len(contents)
    objs: dict[int, bytes] = {1: b"<< /Type /Catalog /Pages 2 0 R >>"}
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n))
    objs[2] = f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode()
    key = None
    enc_num = 3 + 2 * n
    if user_password is not None:
        p = -4
        o = _rc4(hashlib.md5(_pad(owner_password)).digest()[:5], _pad(user_password))
        key = hashlib.md5(_pad(user_password) + o + struct.pack("<i", p) + file_id).digest()[:5]
        u = _rc4(key, _PAD)
        objs[enc_num] = f"<< /Filter /Standard /V 1 /R 2 /O <{o.hex()}> /U <{u.hex()}> /P {p} >>".encode()
    w, h = size
    for i, content in enumerate(contents):
        pn, cn = 3 + 2 * i, 4 + 2 * i
        objs[pn] = f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {w} {h}] /Contents {cn} 0 R >>".encode()
        data = content
        if key is not None:
            data = _rc4(hashlib.md5(key + struct.pack("<i", cn)[:3] + b"\0\0").digest()[:10], data)
        objs[cn] = f"<< /Length {len(data)} >>\nstream\n".encode() + data + b"\nendstream"
    trailer = f"/ID [<{file_id.hex()}> <{file_id.hex()}>]"
    if key is not None:
        trailer += f" /Encrypt {enc_num} 0 R"
    return _write_objects(path, objs, trailer)


# The widget of `make_form_pdf`, in points from the bottom left of its 200×100 pt page.
FORM_FIELD_RECT = (20, 30, 180, 60)


# The field types of `make_form_pdf`: its /FT and /Ff (field flags; 1 << 17 makes a choice a combo box).
FORM_FIELDS = {"text": "/FT /Tx", "combo": f"/FT /Ch /Ff {1 << 17} /Opt [(FILLED) (OTHER)]",
               "list": "/FT /Ch /Opt [(FILLED) (OTHER)]"}


def make_form_pdf(path: Path, value: str = "FILLED", kind: str = "text") -> Path:
    """A 200×100 pt page whose only content is one filled form field of ``kind`` (text, combo or list;
    AcroForm widget at `FORM_FIELD_RECT`).

    The value is drawn only by the widget's appearance stream (Helvetica 14 pt, black), as form-filling
    applications save it; the page's own content is empty.
    """
    x0, y0, x1, y1 = FORM_FIELD_RECT
    appearance = f"/Tx BMC q BT /Helv 14 Tf 0 g 4 8 Td ({value}) Tj ET Q EMC".encode()
    objs = {
        1: b"<< /Type /Catalog /Pages 2 0 R /AcroForm << /Fields [4 0 R] /DA (/Helv 0 Tf 0 g) "
           b"/DR << /Font << /Helv 6 0 R >> >> >> >>",
        2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        3: b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] /Annots [4 0 R] >>",
        4: f"<< /Type /Annot /Subtype /Widget {FORM_FIELDS[kind]} /T (name) /V ({value}) /Rect [{x0} {y0} {x1} {y1}] "
           f"/P 3 0 R /F 4 /DA (/Helv 14 Tf 0 g) /AP << /N 5 0 R >> >>".encode(),
        5: f"<< /Type /XObject /Subtype /Form /BBox [0 0 {x1 - x0} {y1 - y0}] "
           f"/Resources << /Font << /Helv 6 0 R >> >> /Length {len(appearance)} >>\nstream\n".encode()
           + appearance + b"\nendstream",
        6: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    }
    return _write_objects(path, objs)


# A minimal XFA packet (an empty form template), enough for pdfium to call the document an XFA form.
_XDP = (b'<?xml version="1.0" encoding="UTF-8"?><xdp:xdp xmlns:xdp="http://ns.adobe.com/xdp/">'
        b'<template xmlns="http://www.xfa.org/schema/xfa-template/3.3/"><subform name="form1"/></template>'
        b'</xdp:xdp>')


def make_xfa_pdf(path: Path, *, dynamic: bool = False, pages: int = 1) -> Path:
    """``pages`` black-box pages of an XFA form: an AcroForm with an /XFA packet and one text field.
    pdfium calls it a foreground XFA form (the pages and the field are its static fallback), or with
    ``dynamic`` (the catalog's /NeedsRendering) a full one; pypdfium2's wheels cannot draw either."""
    kids = " ".join(f"{5 + 2 * k} 0 R" for k in range(pages))
    objs = {
        1: b"<< /Type /Catalog /Pages 2 0 R /AcroForm << /Fields [3 0 R] /XFA 4 0 R >>"
           + (b" /NeedsRendering true" if dynamic else b"") + b" >>",
        2: f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode(),
        3: b"<< /FT /Tx /T (name) /V (value) >>",
        4: f"<< /Length {len(_XDP)} >>\nstream\n".encode() + _XDP + b"\nendstream",
    }
    for k in range(pages):
        objs[5 + 2 * k] = f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] /Contents {6 + 2 * k} 0 R >>".encode()
        objs[6 + 2 * k] = f"<< /Length {len(BLACK_BOX)} >>\nstream\n".encode() + BLACK_BOX + b"\nendstream"
    return _write_objects(path, objs)


def page_color(k: int) -> tuple[int, int, int]:
    """The colour of the square on page k (0-based) of `make_image_pdf`."""
    return (40 * k % 256, 255 - 30 * k % 256, 100)


def make_image_pdf(path: Path, n_pages: int, size: tuple[float, float] = (144, 72)) -> Path:
    """A PDF made with pypdfium2: page k holds a 36×36 pt square of `page_color(k)` at (18, 18) pt."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pdf = pdfium.PdfDocument.new()
    try:
        for k in range(n_pages):
            page = pdf.new_page(*size)
            img = pdfium.PdfImage.new(pdf)
            img.set_bitmap(pdfium.PdfBitmap.from_pil(Image.new("RGB", (4, 4), page_color(k))))
            img.set_matrix(pdfium.PdfMatrix().scale(36, 36).translate(18, 18))
            page.insert_obj(img)
            page.gen_content()
            page.close()
        pdf.save(str(path))
    finally:
        pdf.close()
    return Path(path)


def make_document_folder(root: Path) -> Path:
    """A folder of the runs spread over several workers: a 6-page PDF, a 3-page PDF in a subfolder
    and a PNG."""
    make_image_pdf(root / "a.pdf", 6)
    make_image_pdf(root / "sub" / "b.pdf", 3)
    Image.new("RGB", (80, 50), "white").save(root / "c.png")
    return root
