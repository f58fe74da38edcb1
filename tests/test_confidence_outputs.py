"""Confidences in the document outputs: hOCR ``x_wconf`` on words and lines, ALTO ``WC`` on words and
``PC`` on pages (both files still valid), and the overlay's colours by confidence with their legend.
Unknown confidences (None, or records stored before confidences existed) are left out, or grey."""

from __future__ import annotations

from PIL import Image
from lxml import etree

from kosmos_cli.results import PageResult
from kosmos_cli.writers.formats import FORMATS
from kosmos_cli.writers.overlay import CONFIDENCE_BINS, UNKNOWN, confidence_colour, draw_overlay
from tests.helpers.validators import ALTO, XHTML, assert_valid_alto, assert_valid_hocr
from tests.test_formats import OCR, page

TOP, HIGH, MID, LOW = (colour for _, colour, _ in CONFIDENCE_BINS)


def scored_pages() -> list[PageResult]:
    """Page 1: a line with all its confidences; one whose line and one word are unknown; one of an
    older record (no keys); one whose word list has the wrong length. Page 2 failed; page 3 has no
    page confidence."""
    first = page(1, [("Total 50,000 due", (24, 872, 827, 921)), ("Invoice no", (100, 100, 400, 160)),
                     ("Old line", (100, 200, 400, 260)), ("Two words", (100, 300, 400, 360))], confidence=0.912345)
    first.lines[0].update(confidence=0.987, word_confidences=[1.0, 0.5, 0.004])
    first.lines[1].update(confidence=None, word_confidences=[0.25, None])
    first.lines[3].update(confidence=0.75, word_confidences=[0.75])  # one value for two words: unknown words
    return [first, PageResult.failed("scans/a.pdf", 2, "ocr", page(2, []).model, "boom"),
            page(3, [("Page three", (10, 20, 600, 80))])]


def strip_confidences(results: list[PageResult]) -> list[PageResult]:
    """The records as an older version stored them: no confidence keys at all."""
    old = []
    for r in results:
        d = r.to_dict()
        d.pop("confidence")
        d.pop("new_tokens")
        d["lines"] = [{"text": ln["text"], "polygon": ln["polygon"]} for ln in d["lines"]]
        old.append(PageResult.from_dict(d))
    return old


# --------------------------------------------------------------------------------------------------
# hOCR and ALTO
# --------------------------------------------------------------------------------------------------


def _wconf(title: str) -> int | None:
    found = [part.split() for part in title.split(";") if part.split()[0] == "x_wconf"]
    return int(found[0][1]) if found else None


def hocr_confidences(text: str) -> list[tuple[int | None, list[int | None]]]:
    """(line x_wconf, [word x_wconf]) of every line of an hOCR file."""
    root = etree.fromstring(text.encode("utf-8"))
    return [(_wconf(line.get("title")), [_wconf(w.get("title")) for w in line.findall(f"{XHTML}span")])
            for line in root.iter(f"{XHTML}span") if line.get("class") == "ocr_line"]


def test_hocr_has_x_wconf_on_words_and_lines(tmp_path):
    hocr = FORMATS[".hocr"](OCR, scored_pages())
    (tmp_path / "a.hocr").write_text(hocr, encoding="utf-8")
    assert_valid_hocr(tmp_path / "a.hocr")
    assert hocr_confidences(hocr) == [(99, [100, 50, 0]), (None, [25, None]), (None, [None, None]),
                                      (75, [None, None]), (None, [None, None])]
    assert 'title="bbox 24 872 827 921; x_wconf 99"' in hocr


def test_alto_has_wc_on_strings_and_pc_on_pages(alto_schema):
    results = scored_pages()
    results[0].lines[1]["word_confidences"][0] = 0.000123  # written without an exponent
    alto = FORMATS[".alto.xml"](OCR, results)
    assert_valid_alto(alto_schema, alto)
    root = etree.fromstring(alto.encode("utf-8"))
    assert [p.get("PC") for p in root.iter(f"{ALTO}Page")] == ["0.912345", None, None]
    assert [[s.get("WC") for s in line.iter(f"{ALTO}String")] for line in root.iter(f"{ALTO}TextLine")] == [
        ["1.0", "0.5", "0.004"], ["0.000123", None], [None, None], [None, None], [None, None]]
    assert all(set(el.attrib) <= {"ID", "HPOS", "VPOS", "WIDTH", "HEIGHT"} for el in root.iter(f"{ALTO}TextLine"))
    assert " CC=" not in alto


def test_older_records_give_the_files_they_gave_before(tmp_path, alto_schema):
    old = strip_confidences(scored_pages())
    unknown = scored_pages()
    for r in unknown:
        r.confidence = None
        for line in r.lines:
            line.update(confidence=None, word_confidences=[None] * len(line["text"].split()))
    for name in (".hocr", ".alto.xml"):
        text = FORMATS[name](OCR, old)
        assert text == FORMATS[name](OCR, unknown)
        assert not any(key in text for key in ("x_wconf", " WC=", " PC="))
    alto = FORMATS[".alto.xml"](OCR, old)
    assert_valid_alto(alto_schema, alto)
    # page 3 as the writer wrote it before confidences existed
    assert alto.split('<Page ID="p3"')[1].split("</Page>")[0] == (
        ' PHYSICAL_IMG_NR="3" WIDTH="1700" HEIGHT="2200">\n'
        '<PrintSpace HPOS="0" VPOS="0" WIDTH="1700" HEIGHT="2200">\n'
        '<TextBlock ID="p3_b1" HPOS="10" VPOS="20" WIDTH="590" HEIGHT="60">\n'
        '<TextLine ID="p3_l1" HPOS="10" VPOS="20" WIDTH="590" HEIGHT="60">'
        '<String ID="p3_l1_w1" CONTENT="Page" HPOS="10" VPOS="20" WIDTH="236" HEIGHT="60"/><SP/>'
        '<String ID="p3_l1_w2" CONTENT="three" HPOS="305" VPOS="20" WIDTH="295" HEIGHT="60"/></TextLine>\n'
        "</TextBlock>\n</PrintSpace>\n")
    hocr = FORMATS[".hocr"](OCR, old)
    (tmp_path / "a.hocr").write_text(hocr, encoding="utf-8")
    assert_valid_hocr(tmp_path / "a.hocr")
    assert ('<span class="ocr_line" id="line_3_1" title="bbox 10 20 600 80"><span class="ocrx_word" '
            'id="word_3_1_1" title="bbox 10 20 246 80">Page</span>') in hocr


# --------------------------------------------------------------------------------------------------
# Overlays
# --------------------------------------------------------------------------------------------------


def test_confidence_colours_bins():
    assert [confidence_colour(c) for c in (1, 0.95, 0.949, 0.8, 0.5, 0.49, 0.0)] == [TOP, TOP, HIGH, HIGH, MID, LOW, LOW]
    assert [confidence_colour(c) for c in (None, 1.5, -0.1, True, "0.9")] == [UNKNOWN] * 5
    assert len({TOP, HIGH, MID, LOW, UNKNOWN}) == 5


def legend_colours(im: Image.Image, corner: tuple[int, int, int, int]) -> dict[tuple[int, int, int], int]:
    """How many pixels of each swatch colour lie in ``corner`` of ``im``."""
    counts = dict((c, n) for n, c in im.crop(corner).getcolors(1 << 20))
    return {c: counts.get(c, 0) for c in (TOP, HIGH, MID, LOW, UNKNOWN)}


def test_ocr_polygons_take_their_confidence_colour_and_a_legend_says_which():
    confidences = [0.99, 0.9, 0.6, 0.2, None]
    lines = [{"text": "x", "polygon": [10, y, 200, y, 200, y + 30, 10, y + 30], "confidence": c}
             for y, c in zip(range(20, 260, 45), confidences)]
    lines.append({"text": "old", "polygon": [10, 250, 200, 250, 200, 290, 10, 290]})  # no key: unknown
    out = draw_overlay(Image.new("RGB", (400, 300), "white"), PageResult("p.png", 1, "ocr", "m", 400, 300, lines=lines))
    assert [out.getpixel((100, ln["polygon"][1])) for ln in lines] == [TOP, HIGH, MID, LOW, UNKNOWN, UNKNOWN]
    assert out.getpixel((100, 35)) == (255, 255, 255)  # outlines only
    # the legend: a swatch of every colour in the top-right corner, on white, and nothing elsewhere there
    legend = legend_colours(out, (260, 0, 400, 150))
    assert all(n >= 25 for n in legend.values()), legend  # a swatch is at least 5 x 5 pixels
    assert legend_colours(out, (220, 150, 400, 300)) == dict.fromkeys(legend, 0)


def test_the_legend_scales_with_the_page():
    def swatch_pixels(size: int) -> int:
        r = PageResult("p.png", 1, "ocr", "m", size, size, lines=[{"text": "x", "polygon": [1, 1, 5, 1, 5, 5, 1, 5]}])
        out = draw_overlay(Image.new("RGB", (size, size), "white"), r)
        return legend_colours(out, (size // 2, 0, size, size // 2))[TOP]

    small, large = swatch_pixels(300), swatch_pixels(2400)
    # readable on a small page (a swatch as high as the text, 10 pixels or more), larger on a large one
    assert small >= 100 and large >= 4 * small
    tiny = Image.new("RGB", (60, 40), "white")  # no room: no legend rather than one hiding the page
    r = PageResult("p.png", 1, "ocr", "m", 60, 40, lines=[{"text": "x", "polygon": [1, 1, 5, 1, 5, 5, 1, 5]}])
    assert legend_colours(draw_overlay(tiny, r), (0, 0, 60, 40))[TOP] == 0


def test_grounding_boxes_and_labels_take_their_confidence_colour():
    ents = [
        {"text": "a snowman", "span": [12, 21], "boxes": [[0.1, 0.5, 0.4, 0.9]], "confidence": 0.97},
        {"text": "a fire", "span": [26, 32], "boxes": [[10, 100, 100, 140]], "confidence": 0.3},
        {"text": "a hat", "span": [36, 41], "boxes": [[0.5, 0.6, 0.9, 0.9]]},  # older record: unknown
    ]
    r = PageResult("s.png", 1, "ground", "m", 320, 320, text="…", entities=ents)
    out = draw_overlay(Image.new("RGB", (320, 320), "white"), r)
    assert [out.getpixel(xy) for xy in [(32, 240), (10, 120), (160, 250)]] == [TOP, LOW, UNKNOWN]  # left edges
    # each label's background, just above its box's top-left corner, in the box's colour
    assert [out.getpixel(xy) for xy in [(33, 158), (11, 98), (161, 190)]] == [TOP, LOW, UNKNOWN]
    assert all(n >= 25 for n in legend_colours(out, (200, 0, 320, 110)).values())
