"""The hOCR, ALTO and searchable-PDF documents of `kosmos ocr -o`, and `--outputs`: boxes and texts
survive a round trip, the files are valid (hocr-spec; the official ALTO 4.4 schema; the PDF renders as
its input did), bad pages and bad text still give well-formed files, and a re-run that adds a format
builds it from the stored pages alone. (`test_searchable_pdf.py` tests the PDF writer itself.)"""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import pypdfium2 as pdfium
import pytest
from hocr_spec import HocrValidator
from lxml import etree

from kosmos_cli.results import PageResult
from kosmos_cli.tasks import TASKS
from kosmos_cli.writers.atomic import OutputError
from kosmos_cli.writers.directory import OutputDir
from kosmos_cli.writers.formats import FORMATS, Original, choose_documents
from tests.helpers.cli import FAST, kosmos
from tests.helpers.images import write_image
from tests.helpers.pdfs import make_image_pdf
from tests.helpers.validators import ALTO, XHTML, assert_valid_alto, assert_valid_hocr

MODEL = "microsoft/kosmos-2.5"
OCR = TASKS["ocr"]


def page(number: int, lines: list[tuple[str, tuple[int, int, int, int]]], *, source="scans/a.pdf",
         size=(1700, 2200), **fields) -> PageResult:
    """An OCR page result with the given (text, (x0, y0, x1, y1)) lines."""
    return PageResult(source, number, "ocr", MODEL, *size, text="\n".join(t for t, _ in lines),
                      lines=[{"text": t, "polygon": [x0, y0, x1, y0, x1, y1, x0, y1]} for t, (x0, y0, x1, y1) in lines],
                      **fields)


# --------------------------------------------------------------------------------------------------
# Reading the files back
# --------------------------------------------------------------------------------------------------


def _numbers(title: str, name: str) -> list[int]:
    (value,) = [part.split()[1:] for part in title.split(";") if part.split()[0] == name]
    return [int(v) for v in value]


def read_hocr(text: str) -> list[dict]:
    """Pages of an hOCR file: size, ppageno, image, and lines as (box, text, [(word, box)])."""
    root = etree.fromstring(text.encode("utf-8"))  # XHTML: it must be well-formed XML
    pages = []
    for div in root.iter(f"{XHTML}div"):
        assert div.get("class") == "ocr_page"
        title = div.get("title")
        lines = []
        for span in div.findall(f"{XHTML}span[@class='ocr_line']"):
            words = [(w.text, tuple(_numbers(w.get("title"), "bbox"))) for w in span.findall(f"{XHTML}span")]
            assert all(w.get("class") == "ocrx_word" for w in span.findall(f"{XHTML}span"))
            assert "".join(span.itertext()) == " ".join(w for w, _ in words)
            lines.append((tuple(_numbers(span.get("title"), "bbox")), " ".join(w for w, _ in words), words))
        image = re.search(r'image "([^"]*)"', title).group(1)
        pages.append({"bbox": _numbers(title, "bbox"), "ppageno": _numbers(title, "ppageno")[0], "image": image,
                      "lines": lines})
    return pages


def _box(el) -> tuple[int, int, int, int]:
    x, y, w, h = (int(el.get(k)) for k in ("HPOS", "VPOS", "WIDTH", "HEIGHT"))
    return x, y, x + w, y + h


def read_alto(text: str) -> list[dict]:
    """Pages of an ALTO file: size, PHYSICAL_IMG_NR, and lines as (box, text, [(word, box)])."""
    root = etree.fromstring(text.encode("utf-8"))
    pages = []
    for el in root.iter(f"{ALTO}Page"):
        lines = []
        for line in el.iter(f"{ALTO}TextLine"):
            children = list(line)
            words = [(s.get("CONTENT"), _box(s)) for s in children if s.tag == f"{ALTO}String"]
            # String, SP, String, ...: one SP between each two words
            assert [c.tag for c in children] == [f"{ALTO}String", f"{ALTO}SP"] * (len(words) - 1) + [f"{ALTO}String"]
            lines.append((_box(line), " ".join(w for w, _ in words), words))
        pages.append({"size": [int(el.get("WIDTH")), int(el.get("HEIGHT"))],
                      "number": int(el.get("PHYSICAL_IMG_NR")), "lines": lines})
    return pages


# --------------------------------------------------------------------------------------------------
# The writers
# --------------------------------------------------------------------------------------------------

LINES_1 = [("Total 50,000", (24, 872, 827, 921)), ("Invoice", (100, 100, 400, 160)),
           ("a  b   c", (0, 0, 9, 5))]  # several spaces; a line as narrow as its characters
LINES_2 = [("Page two, one line", (10, 20, 1190, 80))]


def test_boxes_and_texts_survive_every_format(tmp_path, alto_schema):
    results = [page(1, LINES_1), page(3, LINES_2, size=(1200, 900))]
    expected = [[(box, " ".join(text.split())) for text, box in lines] for lines in (LINES_1, LINES_2)]

    hocr = FORMATS[".hocr"](OCR, results)
    (tmp_path / "a.hocr").write_text(hocr, encoding="utf-8")
    assert_valid_hocr(tmp_path / "a.hocr")
    pages = read_hocr(hocr)
    assert [p["bbox"] for p in pages] == [[0, 0, 1700, 2200], [0, 0, 1200, 900]]
    assert [p["ppageno"] for p in pages] == [0, 2] and {p["image"] for p in pages} == {"scans/a.pdf"}
    assert [[(box, text) for box, text, _ in p["lines"]] for p in pages] == expected

    alto = FORMATS[".alto.xml"](OCR, results)
    assert_valid_alto(alto_schema, alto)
    pages = read_alto(alto)
    assert [(p["size"], p["number"]) for p in pages] == [([1700, 2200], 1), ([1200, 900], 3)]
    assert [[(box, text) for box, text, _ in p["lines"]] for p in pages] == expected
    assert read_alto(alto) == [{"size": p["size"], "number": p["number"], "lines": h["lines"]}
                               for p, h in zip(pages, read_hocr(hocr))]  # the same words and boxes in both

    # Words tile their line left to right, in proportion to their characters (spaces included).
    (box, _, words), *_ = read_hocr(hocr)[0]["lines"]
    assert words == [("Total", (24, 872, 24 + round(803 * 5 / 12), 921)), ("50,000", (24 + round(803 * 6 / 12), 872, 827, 921))]
    for p in read_hocr(hocr):
        for (x0, y0, x1, y1), _, words in p["lines"]:
            edges = [x for _, (a, _, b, _) in words for x in (a, b)]
            assert edges == sorted(edges) and edges[0] == x0 and edges[-1] == x1
            assert all((b, d) == (y0, y1) for _, (_, b, _, d) in words)


def test_the_files_say_what_made_them_and_that_words_are_estimated():
    results = [page(1, LINES_2)]
    hocr = etree.fromstring(FORMATS[".hocr"](OCR, results).encode())
    meta = {m.get("name"): m.get("content") for m in hocr.iter(f"{XHTML}meta") if m.get("name")}
    assert meta["ocr-system"].startswith("kosmos ") and MODEL in meta["ocr-system"]
    assert meta["ocr-capabilities"] == "ocr_page ocr_line ocrx_word" and meta["ocr-number-of-pages"] == "1"
    assert "not words" in meta["description"]
    alto = etree.fromstring(FORMATS[".alto.xml"](OCR, results).encode())
    assert alto.findtext(f"{ALTO}Description/{ALTO}MeasurementUnit") == "pixel"
    assert alto.findtext(f".//{ALTO}sourceImageInformation/{ALTO}fileName") == "scans/a.pdf"
    software = alto.find(f".//{ALTO}OCRProcessing//{ALTO}processingSoftware")
    assert software.findtext(f"{ALTO}softwareName") == "kosmos"
    assert MODEL in software.findtext(f"{ALTO}applicationDescription")
    assert "not words" in software.findtext(f"{ALTO}applicationDescription")


def test_failed_and_truncated_pages_keep_their_place(tmp_path, alto_schema):
    results = [page(1, LINES_2), PageResult.failed("scans/a.pdf", 2, "ocr", MODEL, "page 2: cannot render"),
               page(3, LINES_2[:1], truncated=True)]
    hocr = FORMATS[".hocr"](OCR, results)
    (tmp_path / "a.hocr").write_text(hocr, encoding="utf-8")
    assert_valid_hocr(tmp_path / "a.hocr")
    assert [(p["ppageno"], len(p["lines"])) for p in read_hocr(hocr)] == [(0, 1), (1, 0), (2, 1)]
    alto = FORMATS[".alto.xml"](OCR, results)
    assert_valid_alto(alto_schema, alto)
    assert [(p["number"], len(p["lines"])) for p in read_alto(alto)] == [(1, 1), (2, 0), (3, 1)]


def test_any_text_gives_well_formed_files(tmp_path, alto_schema):
    nasty = "<b>&amp; \"quoted\" 'single' \x00\x07\x1b bell \ud800 lone \ufffe\uffff é 𝄞 ]]>"
    source = "dir/<&> \"name\";\ud800.pdf"
    results = [page(1, [(nasty, (5, 5, 600, 40)), ("tab\there", (5, 50, 100, 80))], source=source)]
    hocr = FORMATS[".hocr"](OCR, results)
    alto = FORMATS[".alto.xml"](OCR, results)
    (tmp_path / "a.hocr").write_text(hocr, encoding="utf-8")
    assert_valid_hocr(tmp_path / "a.hocr")
    assert_valid_alto(alto_schema, alto)
    for pages in (read_hocr(hocr), read_alto(alto)):
        (first, _, words), (_, second, _) = pages[0]["lines"]
        texts = [w for w, _ in words]
        # What XML can hold comes back unchanged; what it cannot is U+FFFD; a lone surrogate is escaped
        assert texts[:4] == ["<b>&amp;", '"quoted"', "'single'", "\ufffd\ufffd\ufffd"]
        assert "\\ud800" in texts and "\ufffd\ufffd" in texts and texts[-3:] == ["é", "𝄞", "]]>"]
        assert second == "tab here"
    assert etree.fromstring(alto.encode()).findtext(f".//{ALTO}fileName") == results[0].to_dict()["source"]


def test_the_validators_catch_a_broken_file(tmp_path, alto_schema):
    results = [page(1, LINES_2)]
    alto = FORMATS[".alto.xml"](OCR, results).replace(' PHYSICAL_IMG_NR="1"', "")
    assert not alto_schema.validate(etree.fromstring(alto.encode()))
    hocr = FORMATS[".hocr"](OCR, results).replace('<meta name="ocr-system"', '<meta name="x-system"')
    (tmp_path / "a.hocr").write_text(hocr, encoding="utf-8")
    assert not HocrValidator("standard").validate(str(tmp_path / "a.hocr")).is_valid()


# --------------------------------------------------------------------------------------------------
# Choosing the documents
# --------------------------------------------------------------------------------------------------


def test_choose_documents():
    assert choose_documents(OCR, "txt,json") == OCR.documents == (".txt", ".json")
    assert choose_documents(OCR, "alto, hocr,txt,hocr") == (".txt", ".hocr", ".alto.xml")  # the task's order
    assert choose_documents(TASKS["md"], "md") == (".md",)
    with pytest.raises(ValueError, match=r"md cannot write 'hocr' \(it writes md\)"):
        choose_documents(TASKS["md"], "hocr")
    with pytest.raises(ValueError, match=r"ground cannot write 'alto', 'pdf' \(it writes txt,json\)"):
        choose_documents(TASKS["ground"], "txt,alto,pdf")
    with pytest.raises(ValueError, match="no format given"):
        choose_documents(OCR, " ")
    with pytest.raises(ValueError, match="''"):
        choose_documents(OCR, "txt,,json")


def test_output_dir_writes_the_chosen_documents(tmp_path):
    out = OutputDir(tmp_path, "ocr", model=MODEL, documents=(".hocr", ".alto.xml"))
    out.write_page("a", page(1, LINES_2))
    assert out.assemble("a", [1]) == [tmp_path / "a.hocr", tmp_path / "a.alto.xml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".kosmos", "a.alto.xml", "a.hocr"]
    with pytest.raises(ValueError, match="md writes .md, not .hocr"):
        OutputDir(tmp_path, "md", documents=(".hocr",))


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def test_ocr_writes_every_format_in_page_pixels(k25, tmp_path, fixed_answers, alto_schema):
    pdf = make_image_pdf(tmp_path / "doc.pdf", 2)
    out = tmp_path / "out"
    result = kosmos("ocr", pdf, "-o", out, "--outputs", "txt,json,hocr,alto", "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [".kosmos", "doc.alto.xml", "doc.hocr", "doc.json", "doc.txt"]
    pages = json.loads((out / "doc.json").read_text())["pages"]
    expected = [[(tuple(ln["polygon"][:2] + ln["polygon"][4:6]), ln["text"]) for ln in p["lines"]] for p in pages]
    assert all(len(lines) == 2 for lines in expected)

    hocr = read_hocr((out / "doc.hocr").read_text())
    assert [p["bbox"] for p in hocr] == [[0, 0, p["width"], p["height"]] for p in pages]
    assert [[(box, text) for box, text, _ in p["lines"]] for p in hocr] == expected
    assert {p["image"] for p in hocr} == {quote(pages[0]["source"], safe="/")}
    assert_valid_hocr(out / "doc.hocr")

    alto_text = (out / "doc.alto.xml").read_text()
    assert_valid_alto(alto_schema, alto_text)
    alto = read_alto(alto_text)
    assert [p["size"] for p in alto] == [[p["width"], p["height"]] for p in pages]
    assert [[(box, text) for box, text, _ in p["lines"]] for p in alto] == expected


def test_a_rerun_that_adds_formats_needs_no_model(k25, tmp_path, fixed_answers, monkeypatch):
    pdf = make_image_pdf(tmp_path / "doc.pdf", 2)
    out = tmp_path / "out"
    assert kosmos("ocr", pdf, "-o", out, "--model", k25, *FAST).exit_code == 0
    assert sorted(p.name for p in out.glob("doc.*")) == ["doc.json", "doc.txt"]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("doc.*")}

    monkeypatch.setattr("kosmos_cli.engine.load", _refuse)
    result = kosmos("ocr", pdf, "-o", out, "--outputs", "txt,json,pdf,hocr,alto", "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    assert re.search(r"0 pages in .*; 2 already done", result.stderr), result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("doc.*") if p.name in before} == before
    stored = [PageResult.from_dict(p) for p in json.loads((out / "doc.json").read_text())["pages"]]
    assert (out / "doc.hocr").read_text() == FORMATS[".hocr"](OCR, stored)
    assert (out / "doc.alto.xml").read_text() == FORMATS[".alto.xml"](OCR, stored)
    assert (out / "doc.pdf").read_bytes() == FORMATS[".pdf"](OCR, stored, Original(pdf))

    # Only hOCR asked for: only it is (re)built; the files of other formats stay as they are.
    (out / "doc.hocr").unlink()
    result = kosmos("ocr", pdf, "-o", out, "--outputs", "hocr", "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    assert (out / "doc.hocr").read_text() == FORMATS[".hocr"](OCR, stored)


def test_ocr_writes_a_searchable_pdf_of_a_pdf_and_of_an_image(k25, tmp_path, fixed_answers):
    pdf = make_image_pdf(tmp_path / "in" / "doc.pdf", 2)
    write_image(tmp_path / "in" / "scan.png", (300, 200), color="navy")
    out = tmp_path / "out"
    result = kosmos("ocr", tmp_path / "in", "-o", out, "--outputs", "json,pdf", "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [".kosmos", "doc.json", "doc.pdf", "scan.json", "scan.pdf"]
    for stem, source in (("doc", pdf), ("scan", None)):
        pages = json.loads((out / f"{stem}.json").read_text())["pages"]
        made = pdfium.PdfDocument(out / f"{stem}.pdf")
        assert len(made) == len(pages)
        for number, stored in enumerate(pages):
            text = made[number].get_textpage().get_text_range()
            assert [ln["text"] for ln in stored["lines"]] == ["Total 50,000", "past the edge"]
            assert text.split("\r\n") == [ln["text"] for ln in stored["lines"]]
        if source is not None:  # the input's pages, drawn exactly as before
            original = pdfium.PdfDocument(source)
            assert all(_pixels(original[i]) == _pixels(made[i]) for i in range(len(made)))
    scan = pdfium.PdfDocument(out / "scan.pdf")[0]
    assert scan.get_size() == (72.0, 48.0)  # 300×200 px without a DPI: 300 dpi
    assert scan.render(scale=300 / 72).to_pil().convert("RGB").getpixel((150, 100)) == (0, 0, 128)


def _pixels(page) -> bytes:
    return page.render(scale=1).to_pil().tobytes()


def test_a_searchable_pdf_never_replaces_its_input(tmp_path):
    # The command never reads inputs inside -o; a library caller may still aim the two at one file.
    pdf = make_image_pdf(tmp_path / "doc.pdf", 1)
    before = pdf.read_bytes()
    out = OutputDir(tmp_path, "ocr", model=MODEL, documents=(".txt", ".pdf"))
    out.write_page("doc", page(1, LINES_2, size=(144, 72)))
    with pytest.raises(OutputError, match=r"doc\.pdf: it is the input file itself; choose another -o folder"):
        out.assemble("doc", [1], Original(pdf))
    assert pdf.read_bytes() == before and (tmp_path / "doc.txt").exists()  # the other files are written


def test_an_input_pikepdf_cannot_read_gets_its_pdf_from_page_images(k25, tmp_path, fixed_answers, monkeypatch):
    import pikepdf

    def unreadable(*args, **kwargs):  # qpdf repairs almost anything pdfium opens: the failure is simulated
        raise pikepdf.PdfError("unable to find trailer dictionary")

    monkeypatch.setattr(pikepdf, "open", unreadable)
    pdf = make_image_pdf(tmp_path / "doc.pdf", 2)
    out = tmp_path / "out"
    result = kosmos("ocr", pdf, "-o", out, "--outputs", "txt,pdf,hocr", "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    assert (f"kosmos: note: {out / 'doc.pdf'}: the original could not be kept (pikepdf cannot read it: unable to "
            "find trailer dictionary); the searchable PDF is made from page images\n") in result.stderr
    made = pdfium.PdfDocument(out / "doc.pdf")
    assert [made[i].get_size() for i in range(len(made))] == [(144.0, 72.0)] * 2
    assert all(made[i].get_textpage().get_text_range().split("\r\n") == ["Total 50,000", "past the edge"]
               for i in range(len(made)))


def test_an_input_pikepdf_can_neither_read_nor_rebuild_fails_its_pdf_only(k25, tmp_path, fixed_answers, monkeypatch):
    import pikepdf

    def failing(*args, **kwargs):
        raise pikepdf.PdfError("unable to find trailer dictionary")

    monkeypatch.setattr(pikepdf, "open", failing)
    monkeypatch.setattr(pikepdf, "new", failing)
    pdf = make_image_pdf(tmp_path / "doc.pdf", 2)
    out = tmp_path / "out"
    result = kosmos("ocr", pdf, "-o", out, "--outputs", "txt,pdf,hocr", "--model", k25, *FAST)
    assert result.exit_code == 1
    assert (f"{pdf}: cannot write {out / 'doc.pdf'}: pikepdf cannot read it: unable to find trailer dictionary, "
            "nor from page images: cannot write this PDF (unable to find trailer dictionary)") in result.stderr
    assert sorted(p.name for p in out.glob("doc.*")) == ["doc.hocr", "doc.txt"]


def test_a_pdf_output_without_pikepdf_is_a_usage_error(k25, png, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pikepdf" else find_spec(name, *a))
    monkeypatch.setattr("kosmos_cli.engine.load", _refuse)
    result = kosmos("ocr", png, "-o", tmp_path / "out", "--outputs", "pdf", "--model", k25)
    assert result.exit_code == 2
    assert result.stderr == 'kosmos: --outputs pdf needs pikepdf: pip install "pikepdf>=10"\n'


def _refuse(*args, **kwargs):
    raise AssertionError("the model was loaded")


@pytest.mark.parametrize("command, args, message", [
    ("md", ["--outputs", "hocr"], "--outputs: md cannot write 'hocr' (it writes md)"),
    ("ocr", ["--outputs", "txt,docx"], "--outputs: ocr cannot write 'docx' (it writes txt,json,pdf,hocr,alto)"),
    ("ground", ["--outputs", "alto"], "--outputs: ground cannot write 'alto' (it writes txt,json)"),
    ("ocr", ["--outputs", ""], "--outputs: no format given (ocr writes txt,json,pdf,hocr,alto)"),
])
def test_an_output_the_task_cannot_write_is_a_usage_error(k25, png, tmp_path, monkeypatch, command, args, message):
    monkeypatch.setattr("kosmos_cli.engine.load", _refuse)
    out = tmp_path / "out"
    result = kosmos(command, png, "-o", out, *args, "--model", k25)
    assert result.exit_code == 2 and result.stderr == f"kosmos: {message}\n" and result.stdout == ""
    assert not out.exists() or list(out.iterdir()) == []


def test_outputs_without_an_output_folder_is_a_usage_error(k25, png, monkeypatch):
    monkeypatch.setattr("kosmos_cli.engine.load", _refuse)
    result = kosmos("ocr", png, "--outputs", "hocr", "--model", k25)
    assert result.exit_code == 2 and result.stderr == "kosmos: --outputs needs -o/--output DIR\n"
    assert result.stdout == ""

