"""Damaged PDFs that pdfium renders and pikepdf cannot rebuild still get their searchable PDF: made from
page images (every page, at the run's --dpi, black-and-white pages losslessly at 1 bit, others as
JPEG) with the text layer, and a note saying so; an XMP packet pikepdf cannot read is kept as it is.
First through the writer, then through the installed `kosmos` command."""

from __future__ import annotations

import dataclasses
import io
import json
import weakref
from pathlib import Path

import pikepdf
import pytest
from PIL import Image, ImageChops, ImageStat

from kosmos_cli.documents import page_pixels
from kosmos_cli.results import PageResult
from kosmos_cli.tasks import TASKS
from kosmos_cli.writers import pdf as pdf_writer
from kosmos_cli.writers.directory import OutputDir
from kosmos_cli.writers.pdf import FormatError, Original, searchable_pdf
from tests.helpers.cli import FAST, needs_script, run_kosmos, state_file
from tests.helpers.damaged import (
    DOCUMENT_XMP,
    PAGE_WORD,
    crisp_render,
    looped_pages_pdf,
    overcounted_pdf,
    page_as_pages_root_pdf,
    pdfium_pages,
    xmp_pdf,
)
from tests.helpers.pdfs import make_pdf
from tests.helpers.searchable import ocr_result, page_texts, render

OCR = TASKS["ocr"]
DPI = 100
NOTE = "; the searchable PDF is made from page images"

# Each damaged PDF pikepdf cannot rebuild: its builder, what stops pikepdf, and why the note says
# the original was not kept.
NOT_KEPT = {
    "looped": (looped_pages_pdf, "Loop detected in /Pages structure",
               "pikepdf cannot read it: object 2 0: Loop detected in /Pages structure (getAllPages)"),
    "page-as-root": (page_as_pages_root_pdf, "root of pages tree has no /Kids array",
                     "pikepdf cannot read it: root of pages tree has no /Kids array"),
    "overcounted": (overcounted_pdf, None, "pikepdf finds 2 pages where pdfium finds 3"),
}


def lines_for(path: Path, pages, dpi: float = DPI, model: str = "test/model") -> list[PageResult]:
    """A result with two lines (naming the page) for each page of ``pages``, at ``dpi``."""
    sizes = pdfium_pages(path)
    return [dataclasses.replace(ocr_result(path, n, page_pixels(*sizes[n - 1], dpi), _texts(n)), model=model)
            for n in pages]


def _texts(n: int) -> list[str]:
    return [f"Line one of page {n}", f"Zweite Zeile {n}"]


def image_info(data: bytes) -> list[tuple | None]:
    """Each page's image as (width, height, filter, colour space, bits), None for a page without one."""
    with pikepdf.open(io.BytesIO(data)) as pdf:
        out = []
        for page in pdf.pages:
            images = list(page.get_images().values())
            assert len(images) <= 1
            out.append(None if not images else (int(images[0].Width), int(images[0].Height), str(images[0].Filter),
                                                str(images[0].ColorSpace), int(images[0].BitsPerComponent)))
        return out


def decoded(data: bytes, page: int) -> Image.Image:
    with pikepdf.open(io.BytesIO(data)) as pdf:
        (image,) = pdf.pages[page].get_images().values()
        return pikepdf.PdfImage(image).as_pil_image()


# --------------------------------------------------------------------------------------------------
# The fixtures are damaged as the public files were
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(NOT_KEPT))
def test_pdfium_renders_each_damaged_pdf_and_pikepdf_cannot_rebuild_it(tmp_path, case):
    build, message, _ = NOT_KEPT[case]
    path = build(tmp_path / "in.pdf")
    sizes = pdfium_pages(path)
    assert sizes[0] is not None
    for image in render(path) if None not in sizes else []:
        assert image.getextrema() != ((255, 255),) * 3  # something is drawn
    if message is not None:
        with pytest.raises(pikepdf.PdfError, match=message):
            pikepdf.open(path)
    else:
        with pikepdf.open(path) as pdf:
            assert len(pdf.pages) == 2 and len(sizes) == 3


def test_pikepdfs_default_save_stops_on_the_broken_xmp_packet(tmp_path):
    with pikepdf.open(xmp_pdf(tmp_path / "in.pdf", broken=True)) as pdf:
        with pytest.raises(pikepdf.PdfError, match="While trying to update XMP metadata, an error occurred"):
            pdf.save(io.BytesIO())


# --------------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(NOT_KEPT))
def test_a_pdf_pikepdf_cannot_rebuild_is_made_from_page_images_with_its_text(tmp_path, case):
    build, _, reason = NOT_KEPT[case]
    path = build(tmp_path / "in.pdf")
    sizes = pdfium_pages(path)
    selected = [1] if len(sizes) == 1 else [2, len(sizes)]  # some pages not selected; the last may fail
    results = lines_for(path, [n for n in selected if sizes[n - 1] is not None])
    results += [PageResult.failed(path, n, "ocr", "test/model", "cannot load page") for n in selected
                if sizes[n - 1] is None]
    notes = []
    out = searchable_pdf(OCR, sorted(results, key=lambda r: r.page), Original(path, dpi=DPI, note=notes.append))

    blank = [n for n, size in enumerate(sizes, 1) if size is None]
    gaps = f" (page {blank[0]}, which pdfium cannot render, is blank)" if blank else ""
    assert notes == [f"the original could not be kept ({reason}){NOTE}{gaps}"]
    with pikepdf.open(io.BytesIO(out)) as made:
        assert len(made.pages) == len(sizes)
    made_sizes = pdfium_pages(out)
    expected = [size or sizes[n - 1] for n, size in enumerate(sizes)]  # an unloadable page: the one before's
    assert made_sizes == expected
    texts = page_texts(out)[0]
    for n, text in enumerate(texts, 1):
        has_lines = any(r.page == n and r.error is None for r in results)
        assert text.split("\r\n") == (_texts(n) if has_lines else [""])
    info = image_info(out)
    assert [i is None for i in info] == [size is None for size in sizes]
    assert [i[:2] for i in info if i] == [page_pixels(*s, DPI) for s in sizes if s]


def test_each_line_is_found_in_its_box_on_the_page_images(tmp_path):
    path = looped_pages_pdf(tmp_path / "in.pdf")
    results = lines_for(path, [1, 2, 3])
    out = searchable_pdf(OCR, results, Original(path, dpi=DPI))
    boxes = {r.page - 1: ((r.width, r.height), [_box(ln["polygon"]) for ln in r.lines]) for r in results}
    assert page_texts(out, boxes)[1] == {n - 1: _texts(n) for n in (1, 2, 3)}


def _box(p):
    return min(p[0::2]), min(p[1::2]), max(p[0::2]), max(p[1::2])


def test_black_and_white_pages_are_stored_losslessly_at_one_bit_others_as_grey_or_colour_jpegs(tmp_path):
    path = looped_pages_pdf(tmp_path / "in.pdf")
    out = searchable_pdf(OCR, lines_for(path, [1]), Original(path, dpi=DPI))
    sizes = [page_pixels(*s, DPI) for s in pdfium_pages(path)]
    assert image_info(out) == [(*sizes[0], "/DCTDecode", "/DeviceRGB", 8), (*sizes[1], "/DCTDecode", "/DeviceGray", 8),
                               (*sizes[2], "/FlateDecode", "/DeviceGray", 1)]
    # Page 3 (turned a quarter) is exactly pdfium's drawing of it without anti-aliasing, bit for bit.
    bits = decoded(out, 2)
    assert bits.mode == "1"
    assert ImageChops.difference(bits.convert("RGB"), crisp_render(path, 2, sizes[2])).getbbox() is None
    # The JPEG pages look as pdfium draws the input, anti-aliased (and the output draws them so).
    for k in (0, 1):
        drawn = render(path, size=sizes[k])[k]
        stored = decoded(out, k).convert("RGB")
        assert max(ImageStat.Stat(ImageChops.difference(drawn, stored)).mean) < 2.0
        again = render(out, size=sizes[k])[k]
        assert max(ImageStat.Stat(ImageChops.difference(drawn, again)).mean) < 2.0


def test_page_images_follow_the_dpi_and_fit_the_pixel_limit(tmp_path, monkeypatch):
    path = page_as_pages_root_pdf(tmp_path / "in.pdf")
    for dpi in (50, 150):
        out = searchable_pdf(OCR, lines_for(path, [1], dpi), Original(path, dpi=dpi))
        assert image_info(out)[0][:2] == page_pixels(300, 200, dpi)
        assert page_texts(out)[0] == ["\r\n".join(_texts(1))]
    monkeypatch.setattr(pdf_writer, "MAX_PIXELS", 6000)  # 300×200 pt at 150 dpi is 625×417 px
    out = searchable_pdf(OCR, lines_for(path, [1], 150), Original(path, dpi=150))
    (w, h, *_), = image_info(out)
    assert w * h <= 6000 and abs(w / h - 1.5) < 0.05 and pdfium_pages(out) == [(300.0, 200.0)]
    assert page_texts(out)[0] == ["\r\n".join(_texts(1))]


def test_one_page_image_at_a_time_is_held(tmp_path, monkeypatch):
    path = looped_pages_pdf(tmp_path / "in.pdf")
    draw, drawn = pdf_writer._draw, []

    def tracked(*args, **kwargs):
        assert [ref for ref in drawn if ref() is not None] == []  # every earlier drawing is gone
        image = draw(*args, **kwargs)
        drawn.append(weakref.ref(image))
        return image

    monkeypatch.setattr(pdf_writer, "_draw", tracked)
    searchable_pdf(OCR, lines_for(path, [1, 2, 3]), Original(path, dpi=DPI))
    assert len(drawn) == 5  # pages 1 and 2 drawn twice (crisp, then anti-aliased), page 3 once


def test_the_same_results_give_the_same_page_image_pdf(tmp_path):
    path = looped_pages_pdf(tmp_path / "in.pdf")
    results = lines_for(path, [1, 3])
    first, second = (searchable_pdf(OCR, results, Original(path, dpi=DPI)) for _ in range(2))
    assert first == second


def test_an_encrypted_pdf_pikepdf_cannot_open_is_rendered_with_its_password(tmp_path, monkeypatch):
    def unreadable(*args, **kwargs):
        raise pikepdf.PdfError("unable to find trailer dictionary")

    monkeypatch.setattr(pikepdf, "open", unreadable)
    path = make_pdf(tmp_path / "locked.pdf", 1, user_password="sesame")
    size = page_pixels(200, 100, DPI)
    notes = []
    out = searchable_pdf(OCR, [ocr_result(path, 1, size, _texts(1))],
                         Original(path, "sesame", DPI, note=notes.append))
    monkeypatch.undo()
    reason = "pikepdf cannot read it: unable to find trailer dictionary"
    assert notes == [f"the original could not be kept ({reason}){NOTE}"]
    assert page_texts(out)[0] == ["\r\n".join(_texts(1))]  # opens without a password
    assert image_info(out) == [(*size, "/FlateDecode", "/DeviceGray", 1)]  # its black square on white
    assert decoded(out, 0).getpixel((50 * DPI // 72, size[1] - 50 * DPI // 72)) == 0


def test_a_pdf_made_neither_way_is_a_format_error_naming_both_reasons(tmp_path, monkeypatch):
    path = looped_pages_pdf(tmp_path / "in.pdf")

    def failing(*args, **kwargs):
        raise pikepdf.PdfError("no room")

    monkeypatch.setattr(pikepdf.Pdf, "save", failing)
    notes = []
    with pytest.raises(FormatError) as err:
        searchable_pdf(OCR, lines_for(path, [1]), Original(path, dpi=DPI, note=notes.append))
    assert err.value.reason.startswith("pikepdf cannot read it: object 2 0: Loop detected")
    assert err.value.reason.endswith(", nor from page images: cannot write this PDF (no room)")
    assert notes == []


@pytest.mark.parametrize("broken", [True, False], ids=["broken", "valid"])
def test_the_xmp_packet_is_kept_byte_for_byte_with_the_original(tmp_path, broken):
    path = xmp_pdf(tmp_path / "in.pdf", broken=broken)
    notes = []
    out = searchable_pdf(OCR, lines_for(path, [1]), Original(path, dpi=DPI, note=notes.append))
    assert notes == []  # the original is kept
    with pikepdf.open(io.BytesIO(out)) as made:
        metadata = made.Root.Metadata
        assert metadata.read_raw_bytes() == DOCUMENT_XMP
        assert (metadata.get("/Filter") == pikepdf.Name.FlateDecode) is broken
        assert len(made.pages[0].get_images()) == 0  # its own page, not an image of it
    assert page_texts(out)[0] == [f"{PAGE_WORD}\r\n" + "\r\n".join(_texts(1))]


def test_assemble_tells_warn_of_the_page_images_after_the_files_path(tmp_path):
    path = page_as_pages_root_pdf(tmp_path / "in.pdf")
    notes = []
    out = OutputDir(tmp_path / "out", "ocr", model="test/model", documents=(".txt", ".pdf"), warn=notes.append)
    out.write_page("in", lines_for(path, [1])[0])
    files = out.assemble("in", [1], Original(path, dpi=DPI))
    assert files == [tmp_path / "out" / "in.txt", tmp_path / "out" / "in.pdf"]
    reason = NOT_KEPT["page-as-root"][2]
    assert notes == [f"{tmp_path / 'out' / 'in.pdf'}: the original could not be kept ({reason}){NOTE}"]


# --------------------------------------------------------------------------------------------------
# The installed command
# --------------------------------------------------------------------------------------------------


def store_lines(out: Path, path: Path, pages, model: str, dpi: float) -> None:
    """Store OCR results with lines for ``pages`` under ``out`` as a finished run would have (a random
    checkpoint finds no lines): the run skips those pages and builds the document with them."""
    for result in lines_for(path, pages, dpi, model=model):
        target = state_file(out, "ocr", path.stem, result.page)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(result.to_json() + "\n")


@needs_script
def test_every_damaged_input_gets_its_searchable_pdf(tmp_path, k25):
    scans, out = tmp_path / "scans", tmp_path / "out"
    inputs = {case: build(scans / f"{case}.pdf") for case, (build, _, _) in NOT_KEPT.items()}
    inputs["xmp"] = xmp_pdf(scans / "xmp.pdf", broken=True)
    for path in inputs.values():
        store_lines(out, path, [1], k25, 100)
    result = run_kosmos("ocr", scans, "-o", out, "--outputs", "txt,pdf", "--dpi", "100", "--model", k25, *FAST)
    assert result.returncode == 1, result.stderr  # page 3 of the overcounted PDF cannot be loaded
    assert f"{inputs['overcounted']}: page 3: " in result.stderr
    for case, path in inputs.items():
        made = (out / f"{case}.pdf").read_bytes()
        sizes = pdfium_pages(path)
        assert pdfium_pages(made) == [size or sizes[n - 1] for n, size in enumerate(sizes)]
        assert page_texts(made)[0][0].endswith("\r\n".join(_texts(1)))
        if case == "xmp":
            assert "xmp.pdf: the original" not in result.stderr
            continue
        reason = NOT_KEPT[case][2]
        assert f"kosmos: note: {out / case}.pdf: the original could not be kept ({reason}){NOTE}" in result.stderr
        assert [i[:2] for i in image_info(made) if i] == [page_pixels(*s, 100) for s in sizes if s]  # at --dpi


@needs_script
def test_pages_not_selected_are_page_images_too_and_a_rerun_writes_nothing(tmp_path, k25):
    path = looped_pages_pdf(tmp_path / "doc.pdf")
    out = tmp_path / "out"
    store_lines(out, path, [2], k25, 200)  # the default --dpi
    command = ("ocr", path, "-o", out, "--outputs", "json,pdf", "--pages", "2", "--model", k25, *FAST)
    result = run_kosmos(*command, "-q")
    assert result.returncode == 0 and result.stderr == ""  # --quiet: no note
    made = (out / "doc.pdf").read_bytes()
    assert page_texts(made)[0] == ["", "\r\n".join(_texts(2)), ""]
    assert [i[:2] for i in image_info(made)] == [page_pixels(*s, 200) for s in pdfium_pages(path)]
    assert [p["page"] for p in json.loads((out / "doc.json").read_text())["pages"]] == [2]
    stamp = (out / "doc.pdf").stat().st_mtime_ns
    again = run_kosmos(*command)
    assert again.returncode == 0 and f"note: {out / 'doc.pdf'}: the original could not be kept" in again.stderr
    assert (out / "doc.pdf").stat().st_mtime_ns == stamp
