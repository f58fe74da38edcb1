"""kosmos_cli.documents and kosmos_cli.rasters: PDFs and images opened, pages rendered, pixels read."""

from __future__ import annotations

import gc
import io
import logging
import math
import os
import random
import subprocess
import sys
import threading
import time
import warnings
from fractions import Fraction

import pypdfium2 as pdfium
import pytest
import torch
from PIL import Image

from kosmos_cli import documents as D
from kosmos_cli.documents import DEFAULT_DPI, DocumentError, open_document
from kosmos_cli.pages import ErrorJob, iter_pages
from kosmos_cli.processing.images import clip_pixels, to_rgb
from tests.helpers.images import make_corrupt_g4_tiff, make_image, png_header_only
from tests.helpers.pdfs import FORM_FIELD_RECT, make_form_pdf, make_image_pdf, make_pdf, make_xfa_pdf, page_color
from tests.helpers.cli import needs_script, run_kosmos

IMAGE_EXTS = [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif"]


def near(a, b, tol=12):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------------
# Documents: PDFs
# --------------------------------------------------------------------------------------------------


def test_pdf_pages_render_lazily_at_dpi(tmp_path):
    path = make_image_pdf(tmp_path / "three.pdf", 3, size=(144, 72))
    with open_document(path, dpi=100) as doc:
        assert doc.num_pages == 3 and doc.kind == "pdf" and doc.source == path
        for k in range(3):
            im = doc.page(k).image
            assert im.mode == "RGB"
            assert im.size == (math.ceil(144 * 100 / 72), math.ceil(72 * 100 / 72))
            # square at 18..54 pt from the bottom left: centre (36, 36) pt → (50, 50) px from the top left
            assert near(im.getpixel((50, im.height - 50)), page_color(k))
            assert im.getpixel((im.width - 3, 3)) == (255, 255, 255)
        with pytest.raises(IndexError):
            doc.page(3)
    assert doc.closed
    doc.close()  # idempotent


def test_default_dpi_letter_size(tmp_path):
    path = make_pdf(tmp_path / "letter.pdf", 1, size=(612, 792))
    assert DEFAULT_DPI in (150, 200)
    im = open_document(path).page(0).image
    assert im.size == (math.ceil(612 * DEFAULT_DPI / 72), math.ceil(792 * DEFAULT_DPI / 72))


def test_encrypted_pdf(tmp_path):
    path = make_pdf(tmp_path / "secret.pdf", 2, user_password="s3cret")
    with pytest.raises(DocumentError, match="encrypted; pass --password"):
        open_document(path)
    with pytest.raises(DocumentError, match="encrypted and the password is wrong"):
        open_document(path, password="nope")
    with open_document(path, dpi=72, password="s3cret") as doc:
        im = doc.page(1).image
        assert doc.num_pages == 2 and im.size == (200, 100)
        assert im.getpixel((50, 50)) == (0, 0, 0)  # the decrypted content stream was drawn
    # owner password opens it too
    assert open_document(path, dpi=72, password="owner").num_pages == 2


def test_owner_only_encryption_ignores_batch_password(tmp_path):
    path = make_pdf(tmp_path / "restricted.pdf", 1, user_password="")
    assert open_document(path, dpi=72).page(0).image.getpixel((50, 50)) == (0, 0, 0)
    assert open_document(path, dpi=72, password="for-another-file").num_pages == 1
    plain = make_pdf(tmp_path / "plain.pdf", 1)
    assert open_document(plain, dpi=72, password="whatever").num_pages == 1


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"%PDF-1.4\nnot really\n", "corrupt"),
        (b"hello, this is text", "corrupt"),
    ],
)
def test_bad_pdfs(tmp_path, content, reason):
    path = tmp_path / "bad.pdf"
    path.write_bytes(content)
    with pytest.raises(DocumentError, match=reason) as info:
        open_document(path)
    assert info.value.path == str(path) and str(info.value).startswith(str(path))


def test_truncated_pdf(tmp_path):
    full = make_pdf(tmp_path / "full.pdf", 3).read_bytes()
    for cut in (len(full) // 3, len(full) - 40):
        path = tmp_path / f"cut{cut}.pdf"
        path.write_bytes(full[:cut])
        with pytest.raises(DocumentError, match="truncated"):
            open_document(path)


def test_pdf_without_pages(tmp_path):
    path = tmp_path / "none.pdf"
    pdf = pdfium.PdfDocument.new()
    pdf.save(str(path))
    pdf.close()
    with pytest.raises(DocumentError, match="page-less|no pages"):
        open_document(path)


def test_gigantic_pdf_page_is_refused_before_rendering(tmp_path):
    path = make_pdf(tmp_path / "huge.pdf", 1, size=(14400, 14400))  # 200×200 in, the PDF maximum
    doc = open_document(path)  # opening is fine
    with pytest.raises(DocumentError, match=r"40000×40000 = 1,600,000,000 pixels.*lower --dpi"):
        doc.page(0)
    assert open_document(path, dpi=2).page(0).image.size == (400, 400)
    with pytest.raises(DocumentError, match="exceeds the limit"):
        open_document(make_pdf(tmp_path / "small.pdf", 1), dpi=72, max_pixels=1000).page(0)


def test_stale_pdfium_error_code_is_not_reported_as_encryption(tmp_path):
    with pytest.raises(DocumentError, match="encrypted"):
        open_document(make_pdf(tmp_path / "enc.pdf", 1, user_password="x"))
    path = tmp_path / "none.pdf"
    pdf = pdfium.PdfDocument.new()
    pdf.save(str(path))
    pdf.close()
    with pytest.raises(DocumentError) as info:
        open_document(path)
    assert "encrypted" not in str(info.value)


PAPER_POINTS = {  # as PDFs store them (ISO sizes rounded to 0.001 pt)
    "letter": ("612", "792"),
    "legal": ("612", "1008"),
    "tabloid": ("792", "1224"),
    "A3": ("841.89", "1190.551"),
    "A4": ("595.276", "841.89"),
    "A5": ("419.528", "595.276"),
}
COMMON_DPI = [72, 96, 150, 200, 300, 600, 1200]


@pytest.mark.parametrize("paper", PAPER_POINTS)
def test_page_pixels_of_common_paper_sizes(tmp_path, paper):
    """Pixels = the page's exact extent at the dpi, rounded up: 792 pt at 300 dpi is 3300 px, not 3301."""
    w_pt, h_pt = PAPER_POINTS[paper]
    path = make_pdf(tmp_path / f"{paper}.pdf", [b""], size=(w_pt, h_pt))
    for dpi in COMMON_DPI:
        exact = tuple(math.ceil(Fraction(v) * dpi / 72) for v in (w_pt, h_pt))
        assert D.page_pixels(float(w_pt), float(h_pt), dpi) == exact, (paper, dpi)
        with open_document(path, dpi=dpi) as doc:
            page = doc.page(0)
        assert page.size == exact, (paper, dpi)
        if exact[0] * exact[1] <= D.WORK_PIXELS:  # rendered at full size: the bitmap is that size
            assert page.image.size == exact, (paper, dpi)
    assert D.page_pixels(612, 792, 300) == (2550, 3300)


@pytest.mark.parametrize("kind", ["text", "combo", "list"])
def test_filled_form_fields_are_drawn(tmp_path, kind):
    path = make_form_pdf(tmp_path / "form.pdf", kind=kind)
    with open_document(path, dpi=72) as doc:
        im = doc.page(0).image.convert("L")
    x0, y0, x1, y1 = FORM_FIELD_RECT
    field = im.crop((x0, im.height - y1, x1, im.height - y0))
    assert field.getextrema()[0] < 64  # the value's glyphs are dark
    outside = im.crop((0, 0, im.width, im.height - y1))
    assert outside.getextrema() == (255, 255)


PDFIUM_LOGGER = pdfium.PdfDocument.init_forms.__module__  # where pypdfium2 logs its XFA warning


@pytest.mark.parametrize("dynamic, note", [(False, D.XFA_NOT_DRAWN), (True, D.DYNAMIC_XFA_NOT_DRAWN)])
def test_an_xfa_form_is_a_note_of_the_document_and_pypdfium2_logs_nothing(tmp_path, caplog, dynamic, note):
    path = make_xfa_pdf(tmp_path / "xfa.pdf", dynamic=dynamic)
    caplog.set_level(logging.WARNING)
    raw = pdfium.PdfDocument(str(path))  # the fixture is what we think: pypdfium2 alone warns about it
    raw.init_forms()
    raw.close()
    assert [r.name for r in caplog.records] == [PDFIUM_LOGGER] and "XFA" in caplog.records[0].getMessage()
    caplog.clear()
    with open_document(path, dpi=72) as doc:
        assert doc.notes == (note,)
        assert doc.page(0).image.convert("L").getextrema()[0] == 0  # the static page is drawn
    assert caplog.records == []  # nothing reached any handler, the root logger's included
    assert logging.getLogger(PDFIUM_LOGGER).filters == []  # and nothing of ours is left on the logger
    with open_document(make_form_pdf(tmp_path / "acro.pdf"), dpi=72) as doc:
        assert doc.notes == ()  # an AcroForm is drawn: nothing to say


def test_pypdfium2_messages_are_held_in_our_thread_only(caplog):
    """The hold is narrow: another thread's records on the same logger, meanwhile, pass as they were."""
    logger = logging.getLogger(PDFIUM_LOGGER)
    caplog.set_level(logging.DEBUG)
    with D._pdfium_messages() as messages:
        logger.warning("ours")
        other = threading.Thread(target=logger.warning, args=("another thread's",))
        other.start()
        other.join()
    logger.warning("after")
    assert messages == ["ours"]
    assert [r.getMessage() for r in caplog.records] == ["another thread's", "after"]


def test_pdf_error_messages_do_not_depend_on_the_file_before(tmp_path):
    """pdfium's last-error code is process-global: each file's message must come from that file alone."""
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\nnot really\n")
    pageless = tmp_path / "none.pdf"
    pdf = pdfium.PdfDocument.new()
    pdf.save(str(pageless))
    pdf.close()
    encrypted = make_pdf(tmp_path / "enc.pdf", 1, user_password="x")
    good = make_pdf(tmp_path / "good.pdf", 1)

    def message(path):
        try:
            open_document(path).close()
        except DocumentError as exc:
            return exc.reason
        return None

    for target in (broken, pageless):
        after = {before.name: (message(before), message(target))[1] for before in (encrypted, good, broken, pageless)}
        assert len(set(after.values())) == 1, after
    assert "encrypted" not in message(pageless) and "no pages" in message(pageless)
    assert "corrupt" in message(broken)


def test_saslprep():
    sasl = D._saslprep
    assert sasl("I\u00adX") == "IX"  # soft hyphen: mapped to nothing (RFC 4013 examples)
    assert sasl("user") == "user" and sasl("USER") == "USER"
    assert sasl("\u00aa") == "a" and sasl("\u2168") == "IX"  # NFKC
    assert sasl("pass\u00a0word") == "pass word"  # non-ASCII space → space
    assert sasl("\ufb01le") == "file" and sasl("\uff46\uff49\uff4c\uff45") == "file"
    assert sasl("\u0007") is None  # prohibited: control character
    assert sasl("\u0627\u0031") is None  # bidi: RandAL first but not last
    assert sasl("\u0627\u0031\u0628") == "\u0627\u0031\u0628"


@pytest.mark.parametrize("typed", ["\ufb01le", "\uff46\uff49\uff4c\uff45", "fi\u00adle"])
def test_aes256_password_is_saslprepped(tmp_path, typed):
    """PDF 2.0: an R6 password is SASLprep'd, so what a user types opens what a conforming writer stored."""
    pikepdf = pytest.importorskip("pikepdf")
    path = tmp_path / "r6.pdf"
    with pikepdf.new() as pdf:
        pdf.add_blank_page(page_size=(200, 100))
        pdf.save(path, encryption=pikepdf.Encryption(user="file", owner="owner-pw", R=6))
    with open_document(path, password=typed) as doc:
        assert doc.num_pages == 1
    with pytest.raises(DocumentError, match="password is wrong"):
        open_document(path, password="fi1e")
    # a writer that stored the password unprocessed still gets what the user typed, first
    raw = tmp_path / "raw.pdf"
    with pikepdf.new() as pdf:
        pdf.add_blank_page(page_size=(200, 100))
        pdf.save(raw, encryption=pikepdf.Encryption(user=typed, owner="owner-pw", R=6))
    assert open_document(raw, password=typed).num_pages == 1


def test_pdf_sniffed_by_content(tmp_path):
    path = tmp_path / "actually_a_pdf.png"
    path.write_bytes(make_pdf(tmp_path / "x.pdf", 2).read_bytes())
    assert open_document(path).kind == "pdf"


def test_concurrent_pdf_renders_are_serialised_and_correct(tmp_path):
    paths = [make_image_pdf(tmp_path / f"d{i}.pdf", 4) for i in range(2)]
    docs = [open_document(p, dpi=72) for p in paths]
    expected = {(i, k): docs[i].page(k).image.tobytes() for i in range(2) for k in range(4)}
    errors = []

    def work(seed):
        rng = random.Random(seed)
        for _ in range(25):
            i, k = rng.randrange(2), rng.randrange(4)
            if docs[i].page(k).image.tobytes() != expected[(i, k)]:
                errors.append((i, k))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for d in docs:
        d.close()


@pytest.fixture
def unraisable(monkeypatch):
    """Exceptions Python would print as "Exception ignored in ..." (from finalizers)."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: seen.append(info.exc_type))
    return seen


def test_dropping_a_document_never_blocks_on_the_pdfium_lock(tmp_path, unraisable):
    doc = open_document(make_pdf(tmp_path / "a.pdf", 1))
    handle = doc._pdf
    locked, release = threading.Event(), threading.Event()

    def render_elsewhere():  # stands for a long render in a worker thread
        with D.PDFIUM_LOCK:
            locked.set()
            release.wait(2)

    worker = threading.Thread(target=render_elsewhere)
    worker.start()
    locked.wait()
    try:
        started = time.monotonic()
        del doc  # the last reference: the finalizer runs here, while the worker holds the lock for 2 s
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
        worker.join()
    gc.collect()
    assert handle.raw is not None  # not closed behind the lock's back...
    open_document(make_pdf(tmp_path / "b.pdf", 1)).close()
    assert handle.raw is None  # ...but by the next pdfium call
    assert unraisable == []


def test_ctrl_c_in_a_document_finalizer_is_not_printed(tmp_path, unraisable):
    """A second Ctrl-C during cleanup must not print "Exception ignored in Document.__del__"."""

    class Interrupted:
        def close(self):
            raise KeyboardInterrupt

    doc = D.Document(tmp_path / "x.pdf", "pdf", 1, 72, D.MAX_PIXELS, pdf=Interrupted())
    del doc
    gc.collect()
    assert unraisable == []


def test_the_last_release_closes_the_document(tmp_path):
    doc = open_document(make_pdf(tmp_path / "a.pdf", 3))
    doc.claim(2)
    doc.claim()
    for _ in range(2):
        doc.release()
        assert not doc.closed
    doc.release()
    assert doc.closed


# --------------------------------------------------------------------------------------------------
# Documents: images
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", IMAGE_EXTS)
def test_every_image_type(tmp_path, ext):
    path = tmp_path / f"img{ext}"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(path)
    with open_document(path, dpi=300) as doc:  # dpi does not resize images
        assert doc.kind == "image" and doc.num_pages == 1
        im = doc.page(0).image
    assert im.mode == "RGB" and im.size == (64, 48)
    assert near(im.getpixel((10, 10)), (200, 40, 40), tol=30)


def test_uppercase_extension(tmp_path):
    path = tmp_path / "SCAN.JPEG"
    Image.new("RGB", (8, 8), "white").save(path, format="JPEG")
    assert open_document(path).page(0).image.size == (8, 8)


def test_multi_frame_tiff_every_frame_is_a_page(tmp_path):
    path = tmp_path / "multi.tif"
    frames = [Image.new("RGB", (30 + 10 * k, 20), page_color(k)) for k in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    doc = open_document(path)
    assert doc.num_pages == 3
    for k in range(3):
        im = doc.page(k).image
        assert im.size == (30 + 10 * k, 20) and im.getpixel((5, 5)) == page_color(k)


def test_gif_first_frame_only(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    doc = open_document(path)
    assert doc.num_pages == 1
    assert near(doc.page(0).image.getpixel((5, 5)), (255, 0, 0))


@pytest.mark.parametrize("ext", [".jpg", ".tif"])
def test_exif_orientation_applied(tmp_path, ext):
    path = tmp_path / f"rotated{ext}"
    im = Image.new("RGB", (60, 20), (255, 255, 255))
    im.paste((0, 0, 0), (0, 0, 10, 20))  # black stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    im.save(path, exif=exif)
    out = open_document(path).page(0).image
    assert out.size == (20, 60)
    assert near(out.getpixel((10, 3)), (0, 0, 0), tol=40)  # the left stripe is now at the top
    assert near(out.getpixel((10, 50)), (255, 255, 255), tol=40)


@pytest.mark.parametrize("mode, ext", [("RGBA", ".png"), ("LA", ".png"), ("RGBA", ".webp"), ("RGBA", ".tif")])
def test_alpha_composited_on_white(tmp_path, mode, ext):
    im = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # fully transparent black
    im.paste((0, 0, 0, 255), (0, 0, 5, 10))  # left half opaque black
    im = im.convert(mode)
    path = tmp_path / f"alpha{ext}"
    im.save(path, **({"lossless": True} if ext == ".webp" else {}))
    out = open_document(path).page(0).image
    assert out.mode == "RGB"
    assert out.getpixel((8, 5)) == (255, 255, 255)
    assert out.getpixel((2, 5)) == (0, 0, 0)


def test_palette_transparency_and_other_modes(tmp_path):
    p = Image.new("P", (10, 10), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.paste(1, (0, 0, 5, 10))
    path = tmp_path / "p.png"
    p.save(path, transparency=0)
    out = open_document(path).page(0).image
    assert out.getpixel((8, 5)) == (255, 255, 255) and out.getpixel((2, 5)) == (255, 0, 0)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (10, 10), (0, 0, 0, 0)).save(cmyk)
    assert near(open_document(cmyk).page(0).image.getpixel((5, 5)), (255, 255, 255))
    one = tmp_path / "one.bmp"
    Image.new("1", (10, 10), 0).save(one)
    assert open_document(one).page(0).image.getpixel((5, 5)) == (0, 0, 0)


def test_16_bit_scaled_not_clipped(tmp_path):
    im = Image.new("I;16", (4, 4), 32768)
    path = tmp_path / "deep.png"
    im.save(path)
    v = open_document(path).page(0).image.getpixel((1, 1))
    assert 120 <= v[0] <= 135 and v[0] == v[1] == v[2]


def test_pdf_working_image_is_rendered_small_and_size_is_the_full_page(tmp_path):
    """At --dpi 1200 a letter page is 10200×13200 px: pdfium renders ≤ WORK_PIXELS, `size` is the full page."""
    quarter = b"0 0 0 rg 0 0 306 396 re f"  # the lower-left quarter, black
    path = make_pdf(tmp_path / "letter.pdf", [quarter], size=(612, 792))
    with open_document(path, dpi=1200) as doc:
        page = doc.page(0)
    assert page.size == (10200, 13200)
    w, h = page.image.size
    assert page.image.mode == "RGB" and w * h <= D.WORK_PIXELS and w * h > 0.99 * D.WORK_PIXELS
    assert abs(w / h - 10200 / 13200) < 1 / h
    assert page.image.getpixel((w // 4, h * 3 // 4)) == (0, 0, 0)
    assert page.image.getpixel((w * 3 // 4, h // 4)) == (255, 255, 255)
    assert page.image.getpixel((w // 2 - 3, h // 2 + 3)) == (0, 0, 0)  # the quarter ends at the middle
    assert page.image.getpixel((w // 2 + 3, h // 2 - 3)) == (255, 255, 255)


def test_default_letter_page_keeps_its_full_size(tmp_path):
    path = make_pdf(tmp_path / "letter.pdf", 1, size=(612, 792))
    page = open_document(path).page(0)
    assert page.image.size == page.size == (1700, 2200)


def black_square_image(path, size, mode="1", box=(0.25, 0.5, 0.5, 0.75), **save):
    """A white ``size`` image in ``mode`` with a black square at the fractional ``box`` (x0, y0, x1, y1)."""
    im = Image.new("L", size, 255)
    w, h = size
    im.paste(0, (int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)))
    im.convert(mode).save(path, **save)
    return path


@pytest.mark.parametrize(
    "name, mode, save",
    [
        ("fax.png", "1", {}),
        ("scan.tif", "1", {"compression": "group4"}),
        ("photo.jpg", "RGB", {"quality": 90}),
        ("gray.png", "L", {}),
        ("palette.gif", "P", {}),
        ("alpha.webp", "RGBA", {"lossless": True}),
        ("cmyk.jpg", "CMYK", {}),
    ],
)
def test_big_images_are_read_as_a_bounded_working_image(tmp_path, name, mode, save):
    size = (4100, 3100)  # 12.7 MP: a working image of about a third of that per side
    path = black_square_image(tmp_path / name, size, mode, **save)
    page = open_document(path).page(0)
    assert page.size == size
    w, h = page.image.size
    assert page.image.mode == "RGB" and w * h <= D.WORK_PIXELS and abs(w / h - size[0] / size[1]) < 1 / h
    assert near(page.image.getpixel((int(0.375 * w), int(0.625 * h))), (0, 0, 0), tol=40)
    assert near(page.image.getpixel((int(0.75 * w), int(0.25 * h))), (255, 255, 255), tol=40)


def test_big_16_bit_image_is_scaled_not_clipped(tmp_path):
    im = Image.new("I;16", (3000, 2000), 32768)
    im.paste(65535, (0, 0, 1500, 2000))
    path = tmp_path / "deep.png"
    im.save(path)
    page = open_document(path).page(0)
    w, h = page.image.size
    assert page.size == (3000, 2000) and w * h <= D.WORK_PIXELS
    assert page.image.getpixel((w // 4, h // 2)) == (255, 255, 255)
    assert 120 <= page.image.getpixel((w * 3 // 4, h // 2))[0] <= 135


def test_big_image_exif_orientation_applies_to_size_and_image(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    black_square_image(path, (4000, 1200), "RGB", box=(0, 0, 0.1, 1), exif=exif)  # black stripe on the left
    page = open_document(path).page(0)
    assert page.size == (1200, 4000)
    w, h = page.image.size
    assert w < h and w * h <= D.WORK_PIXELS
    assert near(page.image.getpixel((w // 2, 3)), (0, 0, 0), tol=40)  # the left stripe is now at the top
    assert near(page.image.getpixel((w // 2, h // 2)), (255, 255, 255), tol=40)


def test_jpeg_is_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    path = black_square_image(tmp_path / "big.jpg", (8000, 6000), "RGB")
    decoded = []
    real_load = Image.Image.load

    def spy(im):
        out = real_load(im)
        decoded.append(im.size)
        return out

    monkeypatch.setattr(Image.Image, "load", spy)
    page = open_document(path).page(0)
    assert page.size == (8000, 6000)
    assert max(w * h for w, h in decoded) <= 4 * D.WORK_PIXELS  # libjpeg scaled the DCT: never 48 MP


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.png", b"", "empty file"),
        ("junk.jpg", b"this is not an image at all", "not a supported image"),
        ("junk.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 30, "corrupt|not a supported image"),
    ],
)
def test_bad_images(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DocumentError, match=reason):
        open_document(path)


def test_truncated_image_fails_at_render_with_document_error(tmp_path):
    path = tmp_path / "cut.png"
    buf = io.BytesIO()
    Image.effect_noise((200, 200), 60).convert("RGB").save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    doc = open_document(path)  # the header is intact
    with pytest.raises(DocumentError, match="truncated"):
        doc.page(0)


def test_decompression_bomb(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    bomb = png_header_only(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(DocumentError, match=r"900,000,000 pixels") as info:
        open_document(bomb)
    assert "decompression bomb" in str(info.value)
    # Beyond Pillow's own refusal (2 × 89 MP) but within ours: admitted (only the header is read)
    big = png_header_only(tmp_path / "big_scan.png", 20000, 12000)  # 240 MP
    assert open_document(big).num_pages == 1
    # a per-call cap
    small = make_image(tmp_path / "small.png", size=(100, 100))
    with pytest.raises(DocumentError, match="10,000 pixels, over the limit of 1,000"):
        open_document(small, max_pixels=1000)
    # the same check guards every TIFF frame at render time
    tif = tmp_path / "frames.tif"
    Image.new("RGB", (10, 10)).save(tif, save_all=True, append_images=[Image.new("RGB", (100, 100))])
    doc = open_document(tif, max_pixels=5000)
    doc.page(0)
    with pytest.raises(DocumentError, match="page 2: image is 100×100"):
        doc.page(1)


def test_unsupported_directory_missing_unreadable(tmp_path, monkeypatch):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(DocumentError, match="unsupported file type '.txt'"):
        open_document(txt)
    with pytest.raises(DocumentError, match="is a directory"):
        open_document(tmp_path)
    with pytest.raises(DocumentError, match="no such file"):
        open_document(tmp_path / "missing.pdf")
    with pytest.raises(ValueError):
        open_document(txt, dpi=0)

    def deny(*a, **k):
        raise PermissionError(13, "Permission denied", str(a[0]))

    monkeypatch.setattr(D, "open", deny, raising=False)
    with pytest.raises(DocumentError, match="permission denied"):
        open_document(make_pdf(tmp_path / "locked.pdf", 1))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_unreadable_file_real_permissions(tmp_path):
    path = make_pdf(tmp_path / "locked.pdf", 1)
    path.chmod(0)
    try:
        with pytest.raises(DocumentError, match="permission denied"):
            open_document(path)
    finally:
        path.chmod(0o644)


def test_libtiff_warnings_become_page_notes(tmp_path, capfd):
    path = make_corrupt_g4_tiff(tmp_path / "fax.tif")
    (job,) = iter_pages([path])
    assert job.load() is job and job.image is not None
    assert len(job.notes) == 1
    assert job.notes[0].startswith("libtiff: Fax4Decode: Bad code word at line ")
    assert "more libtiff warnings" in job.notes[0]
    assert "Fax4Decode" not in capfd.readouterr().err  # nothing raw on stderr
    bad = make_corrupt_g4_tiff(tmp_path / "cut.tif", unreadable=True)
    (job,) = iter_pages([bad])
    err = job.load()
    assert isinstance(err, ErrorJob) and "libtiff: TIFFFillStrip: Read error on strip 0" in err.error
    assert "TIFFFillStrip" not in capfd.readouterr().err


def test_stderr_of_other_writers_passes_through_a_tiff_decode(tmp_path, capfd):
    """Only libtiff's lines are taken while fd 2 is captured; anything else still reaches stderr."""
    path = make_corrupt_g4_tiff(tmp_path / "fax.tif")
    real_load = Image.Image.load

    def chatty(im):
        os.write(2, b"kosmos: note: from the main thread\n\x1b[2Kprogress\r")
        return real_load(im)

    Image.Image.load = chatty
    try:
        page = open_document(path).page(0)
    finally:
        Image.Image.load = real_load
    assert all("kosmos" not in n and "progress" not in n for n in page.notes)
    err = capfd.readouterr().err
    assert "kosmos: note: from the main thread\n" in err and "\x1b[2Kprogress\r" in err


# --------------------------------------------------------------------------------------------------
# Pixels and Pillow's process-wide settings (kosmos_cli.rasters)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["grey16.png", "float.tif"])
def test_deep_files_read_as_the_same_picture_in_8_bits(tmp_path, name):
    """The pixel rule (kosmos_cli.rasters): a 16-bit or float file reads as the 8-bit picture it holds,
    and the library's preprocessing gives that page the same model input as the picture itself; only
    an in-memory deep image goes through to_rgb's other rule (transformers': clip)."""
    picture = Image.linear_gradient("L").resize((64, 48))  # 2..253
    if name.endswith(".png"):
        deep = picture.convert("I").point(lambda v: v * 257).convert("I;16")  # 8 bits → 16, exactly
    else:
        deep = picture.convert("F").point(lambda v: v / 255)  # 0..1
    path = tmp_path / name
    deep.save(path)
    read = open_document(path).page(0).image
    assert read.tobytes() == to_rgb(picture).tobytes()
    assert to_rgb(read).tobytes() == read.tobytes()
    assert torch.equal(clip_pixels(read), clip_pixels(picture))
    with Image.open(path) as im:
        assert to_rgb(im).tobytes() != read.tobytes()  # an in-memory deep image is the oracle's business


def test_pillow_guard_is_only_raised_and_no_warning_filter_is_touched(tmp_path, monkeypatch):
    path = make_image(tmp_path / "a.png")
    filters = list(warnings.filters)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    open_document(path, max_pixels=5000)
    assert Image.MAX_IMAGE_PIXELS == 5000
    open_document(path, max_pixels=2000).page(0)
    assert Image.MAX_IMAGE_PIXELS == 5000  # never lowered
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the caller's choice: no guard at all
    open_document(path)
    assert Image.MAX_IMAGE_PIXELS is None
    assert warnings.filters == filters


def test_importing_the_library_sets_no_warning_filter():
    code = ("import warnings; before = list(warnings.filters); "
            "import kosmos_cli, kosmos_cli.documents, kosmos_cli.pages, kosmos_cli.writers.sinks; "
            "assert warnings.filters == before")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_an_image_pillow_warns_about_is_refused(tmp_path):
    poster = png_header_only(tmp_path / "poster.png", 20_000, 20_000)  # 400 MP: over our limit, under 2×
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(DocumentError, match="400,000,000 pixels"):
        open_document(poster)  # the library leaves Pillow's warning to its caller...


@needs_script
def test_the_command_reports_a_refused_image_once(tmp_path):
    poster = png_header_only(tmp_path / "poster.png", 20_000, 20_000)
    proc = run_kosmos("md", poster, "--model", "/nonexistent/model")
    assert proc.returncode == 1
    assert f"kosmos: {poster}: image is 20000×20000 = 400,000,000 pixels, over the limit" in proc.stderr
    assert "Warning" not in proc.stderr  # ...the command, which says it in its own words, filters it
