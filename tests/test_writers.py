"""kosmos_cli.writers: schema, atomic files, output layout and resume, overlays, stdout formats."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from PIL import Image

from kosmos_cli.pages import PageJob, iter_pages, prefetch
from kosmos_cli.paths import display_path
from kosmos_cli.results import PageResult
from kosmos_cli.tasks import find_task
from kosmos_cli.tasks.ocr import Line, parse_ocr
from kosmos_cli.writers.atomic import OutputError, atomic_open, atomic_save_png, atomic_write_bytes, atomic_write_text
from kosmos_cli.writers.directory import OutputDir
from kosmos_cli.writers.formats import PAGE_SEPARATOR, page_comment
from kosmos_cli.writers.overlay import draw_overlay
from tests.helpers.pdfs import make_image_pdf

SCHEMA_KEYS = ["source", "page", "task", "model", "width", "height", "text", "confidence", "new_tokens", "lines", "entities", "raw", "truncated", "error"]
MODEL = "microsoft/kosmos-2.5"


def ocr_result(page=1, source="scans/a.pdf", text="Total 50,000", error=None, model=MODEL):
    lines = [Line(text, [24, 872, 827, 872, 827, 921, 24, 921])] if error is None else []
    return PageResult(source, page, "ocr", model, 1700, 2200, text=text if error is None else "",
                      lines=lines, raw="<bbox>…", error=error)


def md_result(page, text, source="a.pdf", error=None):
    return PageResult(source, page, "md", MODEL, 100, 100, text=text, error=error)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------


def test_page_result_matches_the_jsonl_schema():
    r = ocr_result()
    r.entities = [{"text": "a snowman", "span": (12, 21), "boxes": [(0.39, 0.05, 0.98, 0.83)]}]
    line = r.to_json()
    assert "\n" not in line
    d = json.loads(line)
    assert list(d) == SCHEMA_KEYS
    assert d["lines"] == [{"text": "Total 50,000", "polygon": [24, 872, 827, 872, 827, 921, 24, 921]}]
    assert d["entities"] == [{"text": "a snowman", "span": [12, 21], "boxes": [[0.39, 0.05, 0.98, 0.83]]}]
    assert d["truncated"] is False and d["error"] is None and d["width"] == 1700
    back = PageResult.from_json(line)
    assert back.to_dict() == d


def test_page_result_unicode_path_and_failure():
    r = PageResult.failed(Path("scans/ü.pdf"), 3, "md", MODEL, "render failed")
    d = json.loads(r.to_json())
    assert d["source"] == "scans/ü.pdf" and d["error"] == "render failed" and d["page"] == 3
    assert "ü" in r.to_json()  # not \u-escaped


def test_task_names_and_aliases():
    assert [find_task(t).name for t in ["md", "markdown", "ocr", "ground", "grounding"]] == ["md", "md", "ocr", "ground", "ground"]
    with pytest.raises(ValueError):
        find_task("translate")


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


def test_atomic_writes_create_parents_and_replace(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    atomic_write_text(target, "héllo\n")
    assert target.read_text(encoding="utf-8") == "héllo\n"
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    mode = stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0o022)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not mkstemp's 0600
    png = tmp_path / "img" / "x.png"
    atomic_save_png(png, Image.new("RGB", (5, 4), "red"))
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (5, 4)
    assert leftovers(target.parent) == [] and leftovers(png.parent) == []


def test_existing_mode_kept(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("x")
    target.chmod(0o640)
    atomic_write_text(target, "y")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_crash_mid_write_leaves_no_file_and_no_temp(tmp_path, exc):
    target = tmp_path / "doc.md"
    with pytest.raises(exc):
        with atomic_open(target) as f:
            f.write(b"half of the")
            raise exc()
    assert not target.exists() and list(tmp_path.iterdir()) == []
    # an existing file survives a failed replacement untouched
    target.write_text("old")
    with pytest.raises(exc):
        with atomic_open(target) as f:
            f.write(b"new but partial")
            raise exc()
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_crash_inside_png_encoder(tmp_path, monkeypatch):
    target = tmp_path / "page.png"

    def exploding_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save_png(target, Image.new("RGB", (3, 3)))
    assert list(tmp_path.iterdir()) == []


def test_crash_at_rename(tmp_path, monkeypatch):
    target = tmp_path / "x.json"

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OutputError):
        atomic_write_text(target, "{}")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Output layout and resume
# --------------------------------------------------------------------------------------------------


def test_layout_paths(tmp_path):
    out = OutputDir(tmp_path, "ocr")
    assert out.page_file("2024/doc", 3) == tmp_path / ".kosmos" / "ocr" / "2024" / "doc" / "0003.json"
    assert out.document_files("2024/doc") == [tmp_path / "2024" / "doc.txt", tmp_path / "2024" / "doc.json"]
    assert out.overlay_file("doc", 12) == tmp_path / "doc.overlay-0012.png"
    assert OutputDir(tmp_path, "markdown").document_files("d") == [tmp_path / "d.md"]
    assert OutputDir(tmp_path, "ground").page_file("d", 1).parent.parent.name == "ground"


def test_markdown_document_assembled_when_complete(tmp_path):
    out = OutputDir(tmp_path, "md", model=MODEL)
    out.write_page("sub/a", md_result(1, "# One"))
    out.write_page("sub/a", md_result(3, "Three\n"))
    assert out.assemble("sub/a", [1, 2, 3]) == []  # page 2 missing
    assert not (tmp_path / "sub" / "a.md").exists()
    out.write_page("sub/a", md_result(2, "Two"))
    assert out.assemble("sub/a", [3, 1, 2]) == [tmp_path / "sub" / "a.md"]
    assert (tmp_path / "sub" / "a.md").read_text() == (
        "<!-- page 1 -->\n\n# One\n\n<!-- page 2 -->\n\nTwo\n\n<!-- page 3 -->\n\nThree\n"
    )
    # the command's selection decides what the document holds
    out.assemble("sub/a", [2])
    assert (tmp_path / "sub" / "a.md").read_text() == "<!-- page 2 -->\n\nTwo\n"


def test_single_page_has_no_separator_and_errors_have_placeholders(tmp_path):
    out = OutputDir(tmp_path, "md")
    out.write_page("img", md_result(1, "Just text"))
    out.assemble("img", [1])
    assert (tmp_path / "img.md").read_text() == "Just text\n"
    out.write_page("doc", md_result(1, "A"))
    out.write_page("doc", md_result(2, "", error="render failed --> bad"))
    out.assemble("doc", [1, 2])
    text = (tmp_path / "doc.md").read_text()
    assert text.startswith("<!-- page 1 -->\n\nA\n\n<!-- page 2: error: render failed - -> bad -->")
    assert text.count("-->") == 2


def test_ocr_and_ground_documents(tmp_path):
    out = OutputDir(tmp_path, "ocr", model=MODEL)
    out.write_page("a", ocr_result(1, text="first, line"))
    out.write_page("a", ocr_result(2, error="page 2: corrupt"))
    out.write_page("a", ocr_result(3, text="third"))
    txt, js = out.assemble("a", [1, 2, 3])
    assert txt.read_text() == (
        "24,872,827,872,827,921,24,921,first, line\n"
        "\f\n"
        "\f\n"
        "24,872,827,872,827,921,24,921,third\n"
    )
    doc = json.loads(js.read_text())
    assert doc["source"] == "scans/a.pdf" and doc["task"] == "ocr" and doc["model"] == MODEL
    assert [p["page"] for p in doc["pages"]] == [1, 2, 3] and list(doc["pages"][0]) == SCHEMA_KEYS
    assert doc["pages"][1]["error"] == "page 2: corrupt"

    g = OutputDir(tmp_path / "g", "ground")
    g.write_page("snow", PageResult("snow.png", 1, "ground", "microsoft/kosmos-2-patch14-224", 640, 480,
                                    text="An image of a snowman.", entities=[]))
    txt, js = g.assemble("snow", [1])
    assert txt.read_text() == "An image of a snowman.\n"
    assert json.loads(js.read_text())["pages"][0]["text"] == "An image of a snowman."


@pytest.mark.parametrize("bad", [1, 2, 3])
def test_a_failed_page_gets_a_placeholder_and_is_retried(tmp_path, bad):
    md = OutputDir(tmp_path, "md", model=MODEL)
    ocr = OutputDir(tmp_path, "ocr", model=MODEL)
    for page in (1, 2, 3):
        if page == bad:
            md.write_page("d", PageResult.failed("d.pdf", page, "md", MODEL, "render failed"))
            ocr.write_page("d", PageResult.failed("d.pdf", page, "ocr", MODEL, "render failed"))
        else:
            md.write_page("d", md_result(page, f"text {page}"))
            ocr.write_page("d", ocr_result(page, text=f"line {page}"))
    (doc_md,) = md.assemble("d", [1, 2, 3])
    sections = doc_md.read_text().rstrip("\n").split("\n\n")
    assert sections[2 * (bad - 1)] == f"<!-- page {bad}: error: render failed -->"
    assert [s for s in sections if s.startswith("<!--")] == [
        f"<!-- page {p}: error: render failed -->" if p == bad else f"<!-- page {p} -->" for p in (1, 2, 3)]
    txt, js = ocr.assemble("d", [1, 2, 3])
    pages = txt.read_text().split(PAGE_SEPARATOR)
    assert len(pages) == 3 and pages[bad - 1] == ""
    assert all(f"line {p}" in pages[p - 1] for p in (1, 2, 3) if p != bad)
    assert [p["error"] for p in json.loads(js.read_text())["pages"]] == [
        "render failed" if p == bad else None for p in (1, 2, 3)]
    assert not md.is_done("d", bad) and not ocr.is_done("d", bad)
    assert md.failed_pages("d", [1, 2, 3]) == [bad] and md.failed_pages("d", [p for p in (1, 2, 3) if p != bad]) == []
    # the re-run redoes the page and the document loses its placeholder
    md.write_page("d", md_result(bad, f"text {bad}"))
    md.assemble("d", [1, 2, 3])
    assert "error" not in doc_md.read_text() and f"text {bad}" in doc_md.read_text()
    assert md.failed_pages("d", [1, 2, 3]) == []


def age(path: Path) -> tuple[int, int]:
    """Back-date ``path`` (so a rewrite cannot share its mtime) and return (inode, mtime_ns)."""
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


@pytest.mark.parametrize("task", ["md", "ocr"])
def test_unchanged_files_are_not_rewritten(tmp_path, task):
    out = OutputDir(tmp_path, task, model=MODEL)
    make = md_result if task == "md" else (lambda p, t: ocr_result(p, text=t))
    state = out.write_page("d", make(1, "one"))
    out.write_page("d", make(2, "two"))
    docs = out.assemble("d", [1, 2])
    before = [age(p) for p in docs]
    assert OutputDir(tmp_path, task, model=MODEL).assemble("d", [1, 2]) == docs
    assert [identity(p) for p in docs] == before
    # the same result stored again (--overwrite) and the same overlay leave the files alone too
    old_state = age(state)
    out.write_page("d", make(1, "one"))
    assert identity(state) == old_state
    overlay = out.write_overlay("d", 1, Image.new("RGB", (8, 8), "white"))
    old_overlay = age(overlay)
    out.write_overlay("d", 1, Image.new("RGB", (8, 8), "white"))
    assert identity(overlay) == old_overlay
    # changed content is written
    out.write_page("d", make(1, "changed"))
    assert identity(state) != old_state
    out.assemble("d", [1, 2])
    assert all(identity(p) != b for p, b in zip(docs, before))
    assert "changed" in docs[0].read_text()
    out.write_overlay("d", 1, Image.new("RGB", (8, 8), "black"))
    assert identity(overlay) != old_overlay


CORRUPT = {
    "truncated": b'{"source": "a.pdf", "page": 1, "task": "ocr", "mod',
    "not an object": b'[1, 2, 3]\n',
    "wrong type": json.dumps({**ocr_result(1).to_dict(), "page": "1"}).encode(),
    "wrong line": json.dumps({**ocr_result(1).to_dict(), "lines": [{"text": "x"}]}).encode(),
    "missing field": json.dumps({k: v for k, v in ocr_result(1).to_dict().items() if k != "model"}).encode(),
    "other page": json.dumps(ocr_result(2).to_dict()).encode(),
    "invalid utf-8": ocr_result(1, text="caf\u00e9").to_json().encode("utf-8").replace(b"\xc3\xa9", b"\xe9"),
}


@pytest.mark.parametrize("content", list(CORRUPT.values()), ids=list(CORRUPT))
def test_a_corrupt_page_state_is_reported_and_redone(tmp_path, content):
    warnings = []
    out = OutputDir(tmp_path, "ocr", model=MODEL, warn=warnings.append)
    out.write_page("d", ocr_result(1))
    out.write_page("d", ocr_result(2))
    state = out.page_file("d", 1)
    state.write_bytes(content)
    assert not out.is_done("d", 1) and out.is_done("d", 2)
    assert out.read_page("d", 1) is None
    assert out.assemble("d", [1, 2]) == []  # treated as missing: no document
    assert out.failed_pages("d", [1, 2]) == []
    assert len(warnings) == 1  # once per file, however often it is read
    assert display_path(state) in warnings[0] and "page 1 will be redone" in warnings[0]
    out.write_page("d", ocr_result(1))  # the re-run replaces it
    assert out.is_done("d", 1) and len(out.assemble("d", [1, 2])) == 2
    assert len(warnings) == 1


def test_missing_page_state_is_not_a_warning(tmp_path):
    warnings = []
    out = OutputDir(tmp_path, "ocr", model=MODEL, warn=warnings.append)
    assert not out.is_done("d", 1) and out.assemble("d", [1]) == [] and warnings == []
    OutputDir(tmp_path, "ocr").page_file("d", 1).parent.mkdir(parents=True)
    out.page_file("d", 1).write_text("{")
    assert not OutputDir(tmp_path, "ocr").is_done("d", 1)  # no warn given: silent


def test_is_done_rules(tmp_path):
    out = OutputDir(tmp_path, "ocr", model=MODEL)
    assert not out.is_done("a", 1)
    out.write_page("a", ocr_result(1))
    out.write_page("a", ocr_result(2, error="boom"))
    out.write_page("a", ocr_result(3, model="someone/else"))
    out.page_file("a", 4).write_text("{ torn")  # cannot happen with atomic writes, but be safe
    assert [out.is_done("a", p) for p in (1, 2, 3, 4)] == [True, False, False, False]
    assert OutputDir(tmp_path, "ocr").is_done("a", 3)  # no model given: any model counts
    assert not OutputDir(tmp_path, "ocr", model=MODEL, overwrite=True).is_done("a", 1)
    assert not OutputDir(tmp_path, "md", model=MODEL).is_done("a", 1)  # state is per task


def test_resume_skips_finished_pages(tmp_path):
    """A first run stops after two pages; the second renders and computes only the rest."""
    pdf = make_image_pdf(tmp_path / "in" / "book.pdf", 5)
    out = OutputDir(tmp_path / "out", "md", model=MODEL)

    def run(stop_after=None):
        computed = []
        jobs = iter_pages([pdf], dpi=36, skip=lambda j: out.is_done(j.stem, j.page))
        for job in prefetch(jobs, depth=2):
            assert isinstance(job, PageJob)
            if not job.skipped:
                assert job.image is not None
                computed.append(job.page)
                out.write_page(job.stem, md_result(job.page, f"page {job.page} text", source=str(job.source)))
            else:
                assert job.image is None  # never rendered
            if job.is_last:
                out.assemble(job.stem, job.selected)
            if stop_after is not None and len(computed) == stop_after:
                break  # simulated crash / Ctrl-C
        return computed

    assert run(stop_after=2) == [1, 2]
    assert not (tmp_path / "out" / "book.md").exists()
    assert sorted(p.name for p in (tmp_path / "out" / ".kosmos" / "md" / "book").iterdir()) == ["0001.json", "0002.json"]
    assert run() == [3, 4, 5]
    text = (tmp_path / "out" / "book.md").read_text()
    assert [f"<!-- page {k} -->" in text for k in range(1, 6)] == [True] * 5
    assert run() == []  # all done: nothing rendered, document re-assembled identically
    assert (tmp_path / "out" / "book.md").read_text() == text


# --------------------------------------------------------------------------------------------------
# Overlays
# --------------------------------------------------------------------------------------------------


def non_white(im: Image.Image, xy) -> bool:
    return im.getpixel(xy) != (255, 255, 255)


def test_ocr_overlay_draws_polygons():
    page = Image.new("RGB", (400, 300), "white")
    lines = parse_ocr("<bbox><x_10><y_20><x_100><y_40></bbox>hello\n", (200, 150), (400, 300))
    r = PageResult("p.png", 1, "ocr", MODEL, 400, 300, lines=lines)
    out = draw_overlay(page, r)
    assert out.size == page.size and out.mode == "RGB" and out is not page
    assert page.getpixel((20, 40)) == (255, 255, 255)  # the input is not modified
    x0, y0, x1, y1 = lines[0].box  # 20, 40, 200, 80
    for xy in [(x0, y0), (x1, y1), ((x0 + x1) // 2, y0), (x0, (y0 + y1) // 2)]:
        assert non_white(out, xy)
    assert not non_white(out, ((x0 + x1) // 2, (y0 + y1) // 2))  # outline only
    assert not non_white(out, (350, 250))
    assert draw_overlay(page, r.to_dict()).tobytes() == out.tobytes()  # dicts work too


def test_overlay_scales_to_a_different_image_size():
    r = PageResult("p.png", 1, "ocr", MODEL, 400, 300, lines=[{"text": "x", "polygon": [200, 150, 380, 150, 380, 280, 200, 280]}])
    small = draw_overlay(Image.new("RGB", (200, 150), "white"), r)
    assert non_white(small, (100, 75)) and non_white(small, (190, 140))


def test_grounding_overlay_draws_labelled_boxes():
    page = Image.new("RGB", (320, 320), "white")
    ents = [
        {"text": "a snowman", "span": [12, 21], "boxes": [[0.5, 0.5, 0.9, 0.9]]},
        {"text": "a fire", "span": [41, 47], "boxes": [[10, 100, 100, 200]]},  # pixel boxes work too
    ]
    r = PageResult("s.png", 1, "ground", "microsoft/kosmos-2-patch14-224", 320, 320, text="…", entities=ents)
    out = draw_overlay(page, r)
    assert out.size == (320, 320)
    assert non_white(out, (160, 240)) and non_white(out, (288, 240)) and non_white(out, (220, 288))
    assert not non_white(out, (220, 220))  # inside the box
    assert non_white(out, (10, 150)) and non_white(out, (55, 200))
    # the label sits above the first box: some pixels in the band just above y=160 are coloured
    band = out.crop((162, 130, 300, 158))
    assert band.getextrema() != ((255, 255), (255, 255), (255, 255))


def test_overlay_of_a_result_without_boxes_is_a_copy():
    page = Image.new("RGB", (50, 40), (10, 20, 30))
    out = draw_overlay(page, md_result(1, "# md"))
    assert out.tobytes() == page.tobytes() and out is not page
    gray = draw_overlay(Image.new("L", (50, 40), 128), md_result(1, ""))
    assert gray.mode == "RGB"


def test_write_overlay(tmp_path):
    out = OutputDir(tmp_path, "ocr")
    path = out.write_overlay("sub/doc", 2, Image.new("RGB", (10, 10), "white"))
    assert path == tmp_path / "sub" / "doc.overlay-0002.png" and path.exists()


# --------------------------------------------------------------------------------------------------
# stdout formats
# --------------------------------------------------------------------------------------------------


def test_stdout_formats():
    r = ocr_result(text="Total 50,000")
    assert find_task("ocr").text(r) == "24,872,827,872,827,921,24,921,Total 50,000"
    assert find_task("md").text(md_result(1, "# Title")) == "# Title"
    assert find_task("grounding").text(PageResult("s.png", 1, "grounding", "m", 1, 1, text="An image of a cat.")) == "An image of a cat."
    assert page_comment(3) == "<!-- page 3 -->"
    assert page_comment(3, source="a.pdf") == "<!-- a.pdf, page 3 -->"
