"""The searchable-PDF writer (`kosmos_cli.writers.pdf`) and its invisible font (`writers.glyphless`):
the text layer is found where the lines are (pdfium, poppler), nothing visible changes, the input's
structures stay, images are embedded losslessly (JPEGs as they are), the output is small and
deterministic, and failures are `FormatError`s."""

from __future__ import annotations

import io
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pikepdf
import pytest
from pikepdf import Array, Dictionary, Name
from PIL import Image, ImageDraw, ImageFont, ImageOps

from kosmos_cli.tasks import TASKS
from kosmos_cli.writers.glyphless import Encoding, truetype_font
from kosmos_cli.writers.pdf import DEFAULT_IMAGE_DPI, FormatError, Original, searchable_pdf
from tests.helpers.images import noise_image
from tests.helpers.pdfs import make_form_pdf, make_pdf
from tests.helpers.searchable import (
    SCRIPT_LINES,
    VISIBLE,
    feature_pdf,
    line_boxes,
    ocr_result,
    page_texts,
    pdf_page_pixels,
    polygon,
    render,
)

OCR = TASKS["ocr"]
DPI = 144  # the PDF pages' render resolution in these tests


def write(results, original: Original) -> bytes:
    return searchable_pdf(OCR, results, original)


def all_lines(path: Path, dpi: float = DPI, texts=SCRIPT_LINES, password: str | None = None):
    """A result with ``texts`` for every page of the PDF at ``path``, and the page pixel sizes."""
    sizes = pdf_page_pixels(path, dpi, password)
    return [ocr_result(path, n, size, texts) for n, size in enumerate(sizes, 1)], sizes


def bounded_texts(out: bytes, results) -> dict[int, list[str]]:
    """pdfium's text inside each line box of each result, by 0-based page."""
    boxes = {r.page - 1: ((r.width, r.height), [_box(ln["polygon"]) for ln in r.lines]) for r in results}
    return page_texts(out, boxes)[1]


def _box(p):
    return min(p[0::2]), min(p[1::2]), max(p[0::2]), max(p[1::2])


# The page geometries: CropBox inside the MediaBox; a MediaBox away from the origin; a CropBox partly
# outside the MediaBox (pdfium shows their intersection).
GEOMETRIES = {
    "cropbox": dict(media=(0, 0, 600, 800), crop=(50, 60, 550, 760)),
    "offset-mediabox": dict(media=(-30, 40, 570, 840), crop=None),
    "cropbox-past-mediabox": dict(media=(0, 0, 600, 800), crop=(-40, 100, 560, 900)),
}


@pytest.fixture(scope="module", params=list(GEOMETRIES))
def rotated(request, tmp_path_factory):
    """(input path, results for its 4 pages of /Rotate 0, 90, 180, 270, output bytes)."""
    path = feature_pdf(tmp_path_factory.mktemp("rotated") / "in.pdf", **GEOMETRIES[request.param])
    results, _ = all_lines(path)
    return path, results, write(results, Original(path))


# --------------------------------------------------------------------------------------------------
# PDF input: the text layer
# --------------------------------------------------------------------------------------------------


def test_pdfium_finds_every_line_of_every_script_in_its_box_on_rotated_cropped_pages(rotated):
    path, results, out = rotated
    whole, _ = page_texts(out)
    bounded = bounded_texts(out, results)
    assert len(whole) == 4
    for i, text in enumerate(whole):
        assert VISIBLE in text
        for line in SCRIPT_LINES:
            assert line in text, (i, line)
        assert bounded[i] == SCRIPT_LINES, f"page {i + 1} (/Rotate {90 * i})"


def test_pdftotext_finds_every_line_on_rotated_cropped_pages(rotated):
    if shutil.which("pdftotext") is None:
        pytest.skip("poppler's pdftotext is not installed")
    _, _, out = rotated
    run = subprocess.run(["pdftotext", "-raw", "-enc", "UTF-8", "-", "-"], input=out, capture_output=True, timeout=30)
    assert run.returncode == 0, run.stderr
    pages = run.stdout.decode("utf-8").split("\f")
    for i in range(4):
        for line in SCRIPT_LINES:
            assert line in pages[i], (i, line, pages[i])


def test_output_pages_render_exactly_like_the_input_pages(rotated):
    path, _, out = rotated
    before, after = render(path), render(out)
    assert len(before) == len(after) == 4
    for i, (a, b) in enumerate(zip(before, after)):
        assert a.size == b.size and a.tobytes() == b.tobytes(), f"page {i + 1} changed"


def _annotations(page):
    return [(str(a.Subtype), [float(v) for v in a.Rect], str(a.get("/Contents", "")),
             str(a.A.URI) if "/A" in a else None) for a in page.get("/Annots", [])]


def _outline(pdf):
    index = {p.objgen: i for i, p in enumerate(pdf.pages)}
    with pdf.open_outline() as outline:
        return [(item.title, index[item.destination[0].objgen]) for item in outline.root]


def test_the_inputs_pages_boxes_contents_annotations_outline_and_info_are_kept(rotated):
    path, _, out = rotated
    before = path.read_bytes()
    assert before.count(b"/Resources") == 1  # the pages inherit theirs from the /Pages node
    with pikepdf.open(path) as src, pikepdf.open(io.BytesIO(out)) as dst:
        assert len(dst.pages) == len(src.pages) == 4
        for a, b in zip(src.pages, dst.pages):
            for key in ("/MediaBox", "/CropBox", "/Rotate"):
                assert repr(a.obj.get(key)) == repr(b.obj.get(key)), key
            original = a.Contents.read_bytes()
            assert isinstance(b.Contents, Array) and original in [s.read_bytes() for s in b.Contents]
            assert _annotations(a) == _annotations(b)
        assert len(_annotations(dst.pages[0])) == 2
        assert _outline(src) == _outline(dst) == [(f"Chapter {k}", k - 1) for k in range(1, 5)]
        assert {str(k): str(v) for k, v in src.docinfo.items()} == {str(k): str(v) for k, v in dst.docinfo.items()}
        assert str(dst.docinfo.Title) == "A test document"
    assert path.read_bytes() == before  # the input file itself is left alone


def test_pages_not_selected_failed_or_without_lines_keep_their_contents_and_get_no_text(tmp_path):
    path = make_pdf(tmp_path / "five.pdf", [b"0 0 0 rg 20 20 %d 10 re f" % (10 * k) for k in range(1, 6)])
    (w, h) = pdf_page_pixels(path, DPI)[0]
    results = [
        ocr_result(path, 1, (w, h), ["first page"]),
        ocr_result(path, 2, (w, h), ["failed page"], error="out of memory"),
        ocr_result(path, 3, (w, h), []),
        # page 4 not selected
        ocr_result(path, 5, (w, h), ["fifth page"]),
    ]
    out = write(results, Original(path))
    whole, _ = page_texts(out)
    assert whole == ["first page", "", "", "", "fifth page"]
    with pikepdf.open(path) as src, pikepdf.open(io.BytesIO(out)) as dst:
        for n in (2, 3, 4):
            a, b = src.pages[n - 1], dst.pages[n - 1]
            assert isinstance(b.obj.Contents, pikepdf.Stream), n
            assert b.Contents.read_bytes() == a.Contents.read_bytes(), n
            assert "/Font" not in b.obj.get("/Resources", {}), n
        assert isinstance(dst.pages[0].obj.Contents, Array)


def test_a_font_resource_already_named_KosmosOCR_is_kept_and_the_layer_uses_another_name(tmp_path):
    path = feature_pdf(tmp_path / "clash.pdf", (0, 90), own_font_named_kosmos=0, extras=False)
    results, sizes = all_lines(path)
    out = write(results, Original(path))
    whole, bounded = page_texts(out, {0: (sizes[0], line_boxes(sizes[0], len(SCRIPT_LINES)))})
    assert whole[0].startswith(VISIBLE) and bounded[0] == SCRIPT_LINES
    with pikepdf.open(io.BytesIO(out)) as dst:
        fonts = dst.pages[0].Resources.Font
        assert fonts.KosmosOCR.BaseFont == Name.Courier
        assert len(fonts.keys()) == 2
    assert render(path)[0].tobytes() == render(out)[0].tobytes()


def test_the_layer_starts_from_the_default_graphics_and_text_state(tmp_path):
    """The page's content leaves a scaled CTM and odd text state (scaling, spacing, rise, clip mode)."""
    leaky = b"2 0 0 2 10 10 cm 1 0 0 rg BT 50 Tz 5 Tc 10 Tw 20 Ts 7 Tr ET 0 0 20 20 re f"
    path = make_pdf(tmp_path / "leaky.pdf", [leaky], size=(400, 200))
    boxes = [(20, 20, 380, 50), (20, 120, 300, 150)]
    results = [ocr_result(path, 1, (400, 200), ["state is reset", "second line here"], boxes)]
    out = write(results, Original(path))
    assert bounded_texts(out, results)[0] == ["state is reset", "second line here"]


def test_a_page_whose_content_ends_in_a_comment_without_newline_still_gets_its_layer_in_place(tmp_path):
    path = make_pdf(tmp_path / "comment.pdf", [b"2 0 0 2 0 0 cm 0 0 1 rg 10 10 20 20 re f % trailing comment"],
                    size=(200, 100))
    results = [ocr_result(path, 1, (200, 100), ["comment line"], [(20, 10, 180, 25)])]
    out = write(results, Original(path))
    assert bounded_texts(out, results)[0] == ["comment line"]


def test_pages_sharing_resources_pages_not_selected_keep_their_resources(tmp_path):
    pdf = pikepdf.new()
    helvetica = Dictionary(Type=Name.Font, Subtype=Name.Type1, BaseFont=Name.Helvetica)
    shared = pdf.make_indirect(Dictionary(Font=Dictionary(F1=helvetica)))
    for k in range(3):
        content = pdf.make_stream(b"BT /F1 10 Tf 10 10 Td (Page %d) Tj ET" % k)
        pdf.pages.append(pikepdf.Page(Dictionary(Type=Name.Page, MediaBox=Array([0, 0, 200, 100]),
                                                 Resources=shared, Contents=content)))
    path = tmp_path / "shared.pdf"
    pdf.save(path)
    results = [ocr_result(path, n, (200, 100), [f"line {n}"], [(20, 50, 180, 70)]) for n in (1, 2)]
    out = write(results, Original(path))
    assert page_texts(out)[0] == ["Page 0\r\nline 1", "Page 1\r\nline 2", "Page 2"]
    with pikepdf.open(io.BytesIO(out)) as dst:
        assert set(dst.pages[2].Resources.Font.keys()) == {"/F1"}
        assert len(dst.pages[0].Resources.Font.keys()) == 2


def test_a_filled_form_keeps_its_field_and_renders_the_same(tmp_path):
    path = make_form_pdf(tmp_path / "form.pdf", "HELLO")
    results = [ocr_result(path, 1, (400, 200), ["HELLO"], [(48, 90, 150, 120)])]
    out = write(results, Original(path))
    with pikepdf.open(io.BytesIO(out)) as dst:
        assert str(dst.Root.AcroForm.Fields[0].V) == "HELLO"
    assert render(path, forms=True)[0].tobytes() == render(out, forms=True)[0].tobytes()
    assert "HELLO" in page_texts(out)[0][0]


def test_line_polygons_in_any_corner_order_give_the_same_file(tmp_path):
    path = make_pdf(tmp_path / "p.pdf", 1)
    box = (20, 20, 180, 60)
    x0, y0, x1, y1 = box
    shuffled = [x1, y1, x0, y1, x0, y0, x1, y0]
    a = ocr_result(path, 1, (200, 100), ["order"], [box])
    b = ocr_result(path, 1, (200, 100), ["order"], [box])
    b.lines[0]["polygon"] = shuffled
    assert polygon(box) != shuffled
    assert write([a], Original(path)) == write([b], Original(path))


# --------------------------------------------------------------------------------------------------
# Encrypted input
# --------------------------------------------------------------------------------------------------


def _is_decrypted_with_text(out: bytes, text: str) -> bool:
    with pikepdf.open(io.BytesIO(out)) as pdf:
        encrypted = pdf.is_encrypted
    return not encrypted and text in page_texts(out)[0][0]


def test_an_encrypted_pdf_is_written_decrypted_with_its_text(tmp_path):
    path = make_pdf(tmp_path / "rc4.pdf", 1, user_password="secret")
    results = [ocr_result(path, 1, (200, 100), ["locked text"], [(10, 60, 190, 90)])]
    out = write(results, Original(path, "secret"))
    assert _is_decrypted_with_text(out, "locked text")


def test_an_owner_only_pdf_is_written_decrypted_with_or_without_a_batch_password(tmp_path):
    path = make_pdf(tmp_path / "owner.pdf", 1, user_password="")
    results = [ocr_result(path, 1, (200, 100), ["owner text"], [(10, 60, 190, 90)])]
    assert _is_decrypted_with_text(write(results, Original(path)), "owner text")
    assert _is_decrypted_with_text(write(results, Original(path, "some other password")), "owner text")


def test_an_aes256_pdf_with_a_non_ascii_password_is_written_decrypted(tmp_path):
    plain = make_pdf(tmp_path / "plain.pdf", 1)
    path = tmp_path / "aes.pdf"
    with pikepdf.open(plain) as pdf:
        pdf.save(path, encryption=pikepdf.Encryption(user="pässwörd", owner="öwner", R=6))
    results = [ocr_result(path, 1, (200, 100), ["aes text"], [(10, 60, 190, 90)])]
    assert _is_decrypted_with_text(write(results, Original(path, "pässwörd")), "aes text")


def test_an_rc4_pdf_with_a_latin_password_that_the_ocr_opens_is_written_decrypted(tmp_path):
    path = make_pdf(tmp_path / "latin.pdf", 1, user_password="pässwörd")  # Latin-1 = PDFDocEncoding here
    from kosmos_cli.documents import open_document

    with open_document(path, password="pässwörd") as doc:  # the OCR reads it
        assert doc.num_pages == 1
    results = [ocr_result(path, 1, (200, 100), ["latin text"], [(10, 60, 190, 90)])]
    assert _is_decrypted_with_text(write(results, Original(path, "pässwörd")), "latin text")


# --------------------------------------------------------------------------------------------------
# Image input
# --------------------------------------------------------------------------------------------------

SIZE = (200, 150)  # 48×36 pt at 300 dpi: whole points, so that a render at the image's size is 1:1


def _gradient16() -> Image.Image:
    return Image.fromarray((np.arange(SIZE[0] * SIZE[1]).reshape(SIZE[1], SIZE[0]) * 2).astype(np.uint16))


def _rgba() -> Image.Image:
    rgba = np.array(noise_image(*SIZE, seed=2).convert("RGBA"))
    rgba[..., 3] = np.arange(SIZE[0])[None, :] * 255 // (SIZE[0] - 1)
    return Image.fromarray(rgba, "RGBA")


LOSSLESS = {  # name: (image, expected render, max difference, bits a sample)
    "rgb": (lambda: noise_image(*SIZE, seed=1), None, 0, 8),
    "rgba": (_rgba, lambda im: Image.alpha_composite(Image.new("RGBA", SIZE, "white"), im).convert("RGB"), 1, 8),
    "1-bit": (lambda: noise_image(*SIZE, seed=3).convert("1"), None, 0, 1),
    "grey": (lambda: noise_image(*SIZE, seed=4).convert("L"), None, 0, 8),
    "grey16": (_gradient16, lambda im: Image.fromarray((np.array(im) >> 8).astype(np.uint8)).convert("RGB"), 1, 16),
    "palette": (lambda: noise_image(*SIZE, seed=5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), None, 0, 8),
}


@pytest.mark.parametrize("kind", list(LOSSLESS))
def test_a_lossless_image_keeps_its_pixels_depth_and_gets_its_text(tmp_path, kind):
    make, expected, tolerance, bits = LOSSLESS[kind]
    image = make()
    path = tmp_path / f"{kind}.png"
    image.save(path)
    with Image.open(path) as saved:
        assert saved.mode == image.mode
    boxes = [(10, 10, 190, 30), (10, 100, 120, 120)]
    results = [ocr_result(path, 1, SIZE, ["image text", "Ωμέγα 😀"], boxes)]
    out = write(results, Original(path))
    with pikepdf.open(io.BytesIO(out)) as pdf:
        page = pdf.pages[0]
        assert [float(v) for v in page.MediaBox] == [0, 0, 48, 36]
        xobject = page.Resources.XObject.Im0
        assert int(xobject.BitsPerComponent) == bits
        assert (int(xobject.Width), int(xobject.Height)) == SIZE
        if kind == "rgba":
            assert xobject.SMask.read_bytes() == image.getchannel("A").tobytes()
        if kind == "grey16":
            assert xobject.read_bytes() == image.tobytes("raw", "I;16B")
    shown = render(out, size=SIZE)[0]
    reference = expected(image) if expected else image.convert("RGB")
    diff = np.abs(np.asarray(shown, int) - np.asarray(reference, int))
    assert diff.max() <= tolerance, f"{kind}: max difference {diff.max()}"
    assert bounded_texts(out, results)[0] == ["image text", "Ωμέγα 😀"]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_jpeg_is_embedded_byte_for_byte(tmp_path, mode):
    path = tmp_path / "photo.jpg"
    noise_image(*SIZE, seed=6).convert(mode).save(path, quality=80)
    out = write([ocr_result(path, 1, SIZE, ["jpeg text"], [(10, 10, 190, 40)])], Original(path))
    with pikepdf.open(io.BytesIO(out)) as pdf:
        xobject = pdf.pages[0].Resources.XObject.Im0
        assert xobject.Filter == Name.DCTDecode
        assert xobject.read_raw_bytes() == path.read_bytes()
    assert page_texts(out)[0] == ["jpeg text"]


def _pattern() -> Image.Image:
    """A 300×150 picture that looks different under every flip and turn."""
    im = Image.new("RGB", (300, 150), "white")
    draw = ImageDraw.Draw(im)
    draw.rectangle((0, 0, 149, 74), fill="black")
    draw.rectangle((225, 75, 299, 149), fill=(255, 0, 0))
    draw.rectangle((0, 120, 40, 149), fill=(0, 0, 255))
    return im


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_to_the_page_and_the_text(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    _pattern().save(path, exif=exif, quality=95, dpi=(100, 100))
    with Image.open(path) as im:
        shown = ImageOps.exif_transpose(im).convert("RGB")
    assert shown.size == ((150, 300) if orientation >= 5 else (300, 150))
    boxes = [(5, 5, 140, 25), (5, shown.height - 30, 140, shown.height - 10)]
    results = [ocr_result(path, 1, shown.size, ["top line", "bottom line"], boxes)]
    out = write(results, Original(path))
    with pikepdf.open(io.BytesIO(out)) as pdf:
        assert [float(v) for v in pdf.pages[0].MediaBox] == [0, 0, shown.width * 0.72, shown.height * 0.72]
        assert pdf.pages[0].Resources.XObject.Im0.read_raw_bytes() == path.read_bytes()
    page = render(out, size=shown.size)[0]
    coarse = np.abs(np.asarray(page.resize((15, 30)), int) - np.asarray(shown.resize((15, 30)), int))
    assert coarse.mean() < 8, f"mean difference {coarse.mean():.1f}"
    assert bounded_texts(out, results)[0] == ["top line", "bottom line"]


def test_a_cmyk_jpeg_from_an_adobe_encoder_keeps_its_inks_the_right_way_round(tmp_path):
    cmyk = Image.new("CMYK", (200, 100), (230, 0, 0, 0))  # cyan, and a black square on the left
    ImageDraw.Draw(cmyk).rectangle((0, 0, 99, 99), fill=(0, 0, 0, 255))
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path, quality=95)
    with Image.open(path) as im:
        assert "adobe" in im.info  # Pillow writes inverted CMYK with an Adobe marker
    out = write([ocr_result(path, 1, (200, 100), ["cmyk"], [(110, 10, 190, 30)])], Original(path))
    page = np.asarray(render(out, size=(200, 100))[0], int)
    assert page[50, 50].max() < 80  # black
    r, g, b = page[50, 150]
    assert r < 80 and b > 150  # cyan


def test_a_multi_frame_tiff_gives_a_page_per_frame_and_text_only_where_there_are_results(tmp_path):
    frames = [Image.new("L", (100, 80), 50), Image.new("L", (120, 60), 150), Image.new("L", (100, 80), 250)]
    path = tmp_path / "scan.tif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    results = [ocr_result(path, 1, (100, 80), ["frame one"], [(5, 5, 95, 20)]),
               ocr_result(path, 3, (100, 80), ["frame three"], [(5, 5, 95, 20)])]
    out = write(results, Original(path))
    assert page_texts(out)[0] == ["frame one", "", "frame three"]
    with pikepdf.open(io.BytesIO(out)) as pdf:
        assert [[float(v) for v in p.MediaBox][2:] for p in pdf.pages] == [[24, 19.2], [28.8, 14.4], [24, 19.2]]
        assert "/Font" not in pdf.pages[1].Resources
    assert [round(float(np.asarray(p).mean())) for p in render(out)] == [50, 150, 250]


def _png_with(path: Path, dpi):
    im = Image.new("RGB", (300, 150), "white")
    im.save(path, **({"dpi": dpi} if dpi else {}))
    with Image.open(path) as saved:
        return saved.info.get("dpi")


@pytest.mark.parametrize("dpi, points", [
    (None, (300 / DEFAULT_IMAGE_DPI * 72, 150 / DEFAULT_IMAGE_DPI * 72)),
    ((150, 150), (144, 72)),
    ((100, 200), (216, 54)),
    ((1, 1), (72, 36)),  # not a sensible DPI: the default
])
def test_an_image_page_is_its_pixels_at_its_dpi_in_points(tmp_path, dpi, points):
    path = tmp_path / "dpi.png"
    _png_with(path, dpi)
    out = write([ocr_result(path, 1, (300, 150), ["x"], [(10, 10, 50, 30)])], Original(path))
    with pikepdf.open(io.BytesIO(out)) as pdf:
        width, height = (float(v) for v in pdf.pages[0].MediaBox[2:])
    assert DEFAULT_IMAGE_DPI == 300
    assert width == pytest.approx(points[0], rel=2e-4) and height == pytest.approx(points[1], rel=2e-4)


def test_a_quarter_turned_image_swaps_its_dpi_with_its_sides(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "turned.jpg"
    Image.new("RGB", (300, 150), "white").save(path, exif=exif, dpi=(100, 200))
    out = write([ocr_result(path, 1, (150, 300), ["x"], [(10, 10, 50, 30)])], Original(path))
    with pikepdf.open(io.BytesIO(out)) as pdf:
        assert [float(v) for v in pdf.pages[0].MediaBox] == [0, 0, 54, 216]


def test_an_image_too_large_for_a_page_at_its_dpi_is_fitted_into_200_inches(tmp_path):
    path = tmp_path / "banner.png"
    Image.new("L", (4000, 100), 255).save(path, dpi=(10, 10))
    results = [ocr_result(path, 1, (4000, 100), ["a very long banner"], [(10, 10, 3990, 90)])]
    out = write(results, Original(path))
    with pikepdf.open(io.BytesIO(out)) as pdf:
        width, height = (float(v) for v in pdf.pages[0].MediaBox[2:])
    assert width == pytest.approx(14400) and height == pytest.approx(360)
    assert bounded_texts(out, results)[0] == ["a very long banner"]


def test_a_float_tiff_is_stored_as_the_eight_bit_pixels_the_model_read(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.linspace(0, 1, SIZE[0] * SIZE[1], dtype=np.float32).reshape(SIZE[1], SIZE[0]), "F").save(path)
    out = write([ocr_result(path, 1, SIZE, ["float"], [(10, 10, 190, 30)])], Original(path))
    with pikepdf.open(io.BytesIO(out)) as pdf:
        xobject = pdf.pages[0].Resources.XObject.Im0
        assert int(xobject.BitsPerComponent) == 8 and xobject.ColorSpace == Name.DeviceGray
    assert page_texts(out)[0] == ["float"]


# --------------------------------------------------------------------------------------------------
# Size, time, determinism
# --------------------------------------------------------------------------------------------------

_WORDS = ("the of and to in is was for on that with as by at from his her which or be an are had it not but "
          "this have were they one all been their has more when who will would there some text page line").split()


def _book(tmp_path: Path, pages: int):
    """A ``pages``-page Letter PDF and results of 50 lines of 60 characters a page (seeded words)."""
    path = make_pdf(tmp_path / f"book{pages}.pdf", pages, size=(612, 792))
    rng = random.Random(pages)
    results = []
    for n, size in enumerate(pdf_page_pixels(path, 200), 1):
        texts = [" ".join(rng.choice(_WORDS) for _ in range(20))[:60] for _ in range(50)]
        results.append(ocr_result(path, n, size, texts, line_boxes(size, 50, height=size[1] / 120)))
    return path, results


def test_the_text_layer_of_ten_pages_of_fifty_lines_stays_within_its_size_budget(tmp_path):
    path, results = _book(tmp_path, 10)
    out = write(results, Original(path))
    added = len(out) - path.stat().st_size
    print(f"\nsearchable PDF: {added} bytes added for 10 pages of 50 lines ({added / 10:.0f} bytes a page)")
    assert added <= 30_000 + 3_000 * 10
    whole, _ = page_texts(out)
    assert all(r.lines[0]["text"] in text for r, text in zip(results, whole))


def test_writing_a_hundred_page_document_takes_seconds(tmp_path):
    path, results = _book(tmp_path, 100)
    start = time.perf_counter()
    out = write(results, Original(path))
    seconds = time.perf_counter() - start
    added = len(out) - path.stat().st_size
    print(f"\nsearchable PDF: 100 pages of 50 lines written in {seconds:.2f} s, {added} bytes added "
          f"({added / 100:.0f} bytes a page)")
    assert seconds < 60
    assert len(page_texts(out)[0]) == 100


def test_the_same_results_give_the_same_bytes(tmp_path, rotated):
    path, results, out = rotated
    assert write(results, Original(path)) == out
    image = tmp_path / "same.png"
    noise_image(*SIZE, seed=7).save(image)
    image_results = [ocr_result(image, 1, SIZE, ["same"], [(10, 10, 100, 30)])]
    assert write(image_results, Original(image)) == write(image_results, Original(image))


# --------------------------------------------------------------------------------------------------
# The glyph-less font
# --------------------------------------------------------------------------------------------------


def _cmap(data: bytes) -> tuple[dict[int, str], list[int]]:
    """A ToUnicode CMap read back: code → text, and the entry count of every bfrange/bfchar block."""
    text = data.decode("ascii")
    mapping: dict[int, str] = {}
    counts = []
    for count, kind, body in re.findall(r"(\d+) begin(bfrange|bfchar)\n(.*?)\nend\2", text, re.S):
        entries = body.splitlines()
        assert int(count) == len(entries)
        counts.append(len(entries))
        for entry in entries:
            hexes = re.findall(r"<([0-9A-F]+)>", entry)
            if kind == "bfchar":
                mapping[int(hexes[0], 16)] = bytes.fromhex(hexes[1]).decode("utf-16-be")
            else:
                lo, hi, dst = int(hexes[0], 16), int(hexes[1], 16), int(hexes[2], 16)
                for code in range(lo, hi + 1):
                    mapping[code] = chr(dst + code - lo)
    return mapping, counts


def _decode(mapping: dict[int, str], codes: bytes) -> str:
    return "".join(mapping[int.from_bytes(codes[i:i + 2], "big")] for i in range(0, len(codes), 2))


def test_the_font_loads_in_freetype_and_draws_nothing(tmp_path):
    path = tmp_path / "glyphless.ttf"
    path.write_bytes(truetype_font())
    font = ImageFont.truetype(str(path), 64)
    assert font.getname()[0] == "KosmosGlyphless"
    canvas = Image.new("L", (900, 120), 255)
    ImageDraw.Draw(canvas).text((10, 10), "Hello Wörld Ωμέγα 東京 😀 ███", font=font, fill=0)
    assert canvas.getextrema() == (255, 255)
    assert font.getlength("abcd") == pytest.approx(4 * 64 * 0.5)  # every glyph half an em wide


def test_the_font_file_checksum_is_valid():
    data = truetype_font()
    padded = data + b"\0" * (-len(data) % 4)
    total = sum(int.from_bytes(padded[i:i + 4], "big") for i in range(0, len(padded), 4)) & 0xFFFFFFFF
    assert total == 0xB1B0AFBA
    assert len(data) < 1024


def test_the_tounicode_map_round_trips_bmp_text_and_emoji_in_blocks_of_at_most_100():
    texts = ["Hello, wörld", "Καλημέρα", "東京 \uFFFF", "emoji 😀🎉 and 𠀀"]
    encoding = Encoding(texts)
    mapping, counts = _cmap(encoding.to_unicode())
    assert counts and max(counts) <= 100
    for text in texts:
        assert _decode(mapping, encoding.encode(text)) == text
    assert len(encoding.encode("😀")) == 2  # one CID, not a surrogate pair


def test_more_than_2048_astral_characters_map_the_extra_ones_to_the_replacement_character(tmp_path):
    astral = [chr(0x1F300 + i) if i < 1024 else chr(0x20000 + i) for i in range(2100)]
    lines = ["".join(astral[i:i + 100]) for i in range(0, 2100, 100)]
    encoding = Encoding(lines)
    mapping, counts = _cmap(encoding.to_unicode())
    assert max(counts) <= 100
    decoded = "".join(_decode(mapping, encoding.encode(line)) for line in lines)
    assert decoded == "".join(astral[:2048]) + "\uFFFD" * 52
    # and the writer takes them
    path = make_pdf(tmp_path / "astral.pdf", [b""], size=(600, 800))
    size = pdf_page_pixels(path, 72)[0]
    boxes = [(10, 10 + 30 * k, 590, 30 + 30 * k) for k in range(len(lines))]
    out = write([ocr_result(path, 1, size, lines, boxes)], Original(path))
    text = page_texts(out)[0][0]
    assert astral[0] in text and astral[2047] in text and text.count("\uFFFD") == 52


# --------------------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------------------


def test_no_original_is_a_format_error(tmp_path):
    path = make_pdf(tmp_path / "a.pdf", 1)
    with pytest.raises(FormatError) as err:
        searchable_pdf(OCR, [ocr_result(path, 1, (200, 100), ["x"])], None)
    assert err.value.reason


@pytest.mark.parametrize("case", ["missing", "garbage", "wrong-password"])
def test_an_input_that_cannot_be_read_is_a_format_error_with_a_reason(tmp_path, case):
    path = tmp_path / "bad.pdf"
    password = None
    if case == "garbage":
        path.write_bytes(b"%PDF-1.4\nthis is not a PDF at all\n")
    elif case == "wrong-password":
        make_pdf(path, 1, user_password="right")
        password = "wrong"
    with pytest.raises(FormatError) as err:
        write([ocr_result(path, 1, (200, 100), ["x"], [(10, 10, 100, 30)])], Original(path, password))
    assert isinstance(err.value.reason, str) and err.value.reason


def test_a_result_for_a_frame_the_image_does_not_have_is_a_format_error(tmp_path):
    path = tmp_path / "one.png"
    Image.new("RGB", (50, 50), "white").save(path)
    with pytest.raises(FormatError, match="page 2"):
        write([ocr_result(path, 2, (50, 50), ["x"], [(5, 5, 45, 20)])], Original(path))


def test_a_result_for_a_page_the_pdf_does_not_have_is_a_format_error(tmp_path):
    path = make_pdf(tmp_path / "one.pdf", 1)
    with pytest.raises(FormatError, match="page 5"):
        write([ocr_result(path, 5, (200, 100), ["x"], [(5, 5, 45, 20)])], Original(path))
