"""The `kosmos` command, end to end on tiny random checkpoints (CliRunner, plus the installed script).

The checkpoints' greedy output is random-ish text, so these tests check structure and behaviour:
inputs found, pages numbered, schema and types, files laid out, exit codes, messages. Where a test
needs OCR lines or grounded entities, it swaps the task's parser input for a fixed model answer
(`fixed_answers`); everything else (rendering, the model run, scaling to page pixels, writing) is real.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from kosmos_cli import documents
from kosmos_cli.writers import atomic
from kosmos_cli.writers.formats import PAGE_SEPARATOR
from kosmos_cli.cli import app
from tests.helpers import ROOT
from tests.helpers.cli import (
    FAST,
    PAGE_COMMENT,
    assert_no_temp_files,
    jsonl,
    kosmos,
    needs_script,
    run_kosmos,
    state_file,
)
from tests.helpers.images import png_header_only
from tests.helpers.pdfs import make_image_pdf, make_pdf

EXAMPLES = ROOT / "examples"
SCHEMA_KEYS = ["source", "page", "task", "model", "width", "height", "text", "confidence", "new_tokens", "lines", "entities", "raw",
               "truncated", "error"]
OCR_LINE = re.compile(r"^\d+(,\d+){7},.+$")


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------


def check_record(rec: dict, task: str) -> None:
    """The JSONL schema of DESIGN.md, field by field, with types."""
    assert list(rec) == SCHEMA_KEYS
    assert isinstance(rec["source"], str) and rec["source"]
    assert isinstance(rec["page"], int) and rec["page"] >= 1
    assert rec["task"] == task
    assert isinstance(rec["model"], str) and rec["model"]
    assert isinstance(rec["width"], int) and rec["width"] > 0
    assert isinstance(rec["height"], int) and rec["height"] > 0
    assert isinstance(rec["text"], str) and isinstance(rec["raw"], str)
    assert isinstance(rec["truncated"], bool)
    assert rec["error"] is None or isinstance(rec["error"], str)
    assert isinstance(rec["lines"], list) and isinstance(rec["entities"], list)
    for line in rec["lines"]:
        assert isinstance(line["text"], str) and line["text"]
        poly = line["polygon"]
        assert len(poly) == 8 and all(type(v) is int for v in poly)
        xs, ys = poly[0::2], poly[1::2]
        assert all(0 <= x <= rec["width"] for x in xs) and all(0 <= y <= rec["height"] for y in ys), (poly, rec)
        x0, y0, x1, _, _, y1, _, _ = poly
        assert poly == [x0, y0, x1, y0, x1, y1, x0, y1] and x0 < x1 and y0 < y1
    for ent in rec["entities"]:
        assert isinstance(ent["text"], str)
        assert len(ent["span"]) == 2 and all(type(v) is int for v in ent["span"])
        assert ent["boxes"] and all(len(b) == 4 and all(0.0 <= v <= 1.0 for v in b) for b in ent["boxes"])
        for box in ent["pixel_boxes"]:
            assert len(box) == 4 and all(type(v) is int for v in box)
            assert 0 <= box[0] <= rec["width"] and 0 <= box[2] <= rec["width"]
            assert 0 <= box[1] <= rec["height"] and 0 <= box[3] <= rec["height"]


def pdf_size_at(points: tuple[float, float], dpi: float = documents.DEFAULT_DPI) -> tuple[int, int]:
    import math

    return math.ceil(points[0] * dpi / 72), math.ceil(points[1] * dpi / 72)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """One file of every supported type, in subfolders: page counts and sizes are known."""
    root = tmp_path_factory.mktemp("corpus")
    make_image_pdf(root / "docs" / "report.pdf", 2)  # 144×72 pt pages
    (root / "img").mkdir()
    Image.new("RGB", (64, 48), "white").save(root / "img" / "a.png")
    Image.new("RGB", (40, 56), (200, 30, 30)).save(root / "img" / "b.jpg", quality=90)
    frames = [Image.new("RGB", size, c) for size, c in [((64, 48), "red"), ((50, 70), "green"), ((40, 40), "blue")]]
    frames[0].save(root / "img" / "c.tiff", save_all=True, append_images=frames[1:])
    Image.new("RGB", (30, 20), "yellow").save(root / "img" / "d.webp")
    Image.new("RGB", (36, 24), "white").save(root / "img" / "e.bmp")
    gif = [Image.new("P", (32, 32), i) for i in range(3)]
    gif[0].save(root / "img" / "f.gif", save_all=True, append_images=gif[1:])  # animation: one page
    (root / "img" / "notes.txt").write_text("not an input")  # skipped in directory walks
    return root


EXPECTED_PAGES = {  # relative path -> [(page, width, height)]
    "docs/report.pdf": [(1, *pdf_size_at((144, 72))), (2, *pdf_size_at((144, 72)))],
    "img/a.png": [(1, 64, 48)],
    "img/b.jpg": [(1, 40, 56)],
    "img/c.tiff": [(1, 64, 48), (2, 50, 70), (3, 40, 40)],
    "img/d.webp": [(1, 30, 20)],
    "img/e.bmp": [(1, 36, 24)],
    "img/f.gif": [(1, 32, 32)],
}


def pages_of(records: list[dict], root: Path) -> dict[str, list[tuple[int, int, int]]]:
    out: dict[str, list] = {}
    for r in records:
        rel = Path(r["source"]).resolve().relative_to(root.resolve()).as_posix()
        out.setdefault(rel, []).append((r["page"], r["width"], r["height"]))
    return out


# --------------------------------------------------------------------------------------------------
# Inputs: every type, directories, globs, stdin, page selection
# --------------------------------------------------------------------------------------------------


def test_every_input_type_from_a_directory(k25, corpus, fixed_answers):
    result = kosmos("ocr", corpus, "--model", k25, "--format", "jsonl", *FAST)
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    for rec in records:
        check_record(rec, "ocr")
        assert rec["model"] == k25 and len(rec["lines"]) == 2
    # Recursive, sorted, only supported types; every TIFF frame is a page, a GIF is one page;
    # width/height are the rendered page size (PDF at the default dpi, images as they are).
    assert pages_of(records, corpus) == EXPECTED_PAGES
    assert list(pages_of(records, corpus)) == sorted(EXPECTED_PAGES)
    assert "notes.txt" not in result.stderr


def test_glob_and_pages_selection(k25, corpus):
    pattern = str(corpus / "**" / "*.t*f")  # the TIFF only
    result = kosmos("md", pattern, str(corpus / "docs" / "*.pdf"), "--pages", "2-3", "--model", k25,
                    "--format", "jsonl", *FAST)
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert pages_of(records, corpus) == {"img/c.tiff": EXPECTED_PAGES["img/c.tiff"][1:3],
                                         "docs/report.pdf": EXPECTED_PAGES["docs/report.pdf"][1:]}
    # Page 3 does not exist in the 2-page PDF: a note, not a failure.
    assert re.search(r"note: .*report\.pdf: page 3 not in document \(2 pages\)", result.stderr), result.stderr


def test_paths_from_stdin(k25, corpus):
    stdin = f"{corpus / 'img' / 'a.png'}\n\n{corpus / 'docs'}\n"
    result = kosmos("md", "-", "--model", k25, "--format", "jsonl", *FAST, input=stdin)
    assert result.exit_code == 0, result.stderr
    assert pages_of(jsonl(result.stdout), corpus) == {"img/a.png": EXPECTED_PAGES["img/a.png"],
                                                       "docs/report.pdf": EXPECTED_PAGES["docs/report.pdf"]}


# --------------------------------------------------------------------------------------------------
# stdout formats
# --------------------------------------------------------------------------------------------------


def test_ocr_text_format(k25, corpus, fixed_answers):
    result = kosmos("ocr", corpus / "docs" / "report.pdf", corpus / "img" / "a.png", "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    # Two documents: a comment naming the source starts every page.
    comments = [PAGE_COMMENT.match(ln) for ln in lines if ln.startswith("<!--")]
    assert [(Path(m.group(1)).name, int(m.group(2))) for m in comments] == [
        ("report.pdf", 1), ("report.pdf", 2), ("a.png", 1)]
    body = [ln for ln in lines if not ln.startswith("<!--")]
    assert len(body) == 6 and all(OCR_LINE.match(ln) for ln in body), body
    assert body[0].endswith(",Total 50,000")
    # The second line's box runs past the image edge: clipped to the page (here the PDF's first page).
    w, h = pdf_size_at((144, 72))
    poly = [int(v) for v in body[1].split(",")[:8]]
    assert (poly[2], poly[5]) == (w, h) and body[1].endswith(",past the edge")


def test_md_text_format(k25, corpus):
    result = kosmos("md", corpus / "img" / "a.png", corpus / "docs" / "report.pdf", "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    comments = [m for m in map(PAGE_COMMENT.match, result.stdout.splitlines()) if m]
    assert [(Path(m.group(1)).name, int(m.group(2))) for m in comments] == [
        ("a.png", 1), ("report.pdf", 1), ("report.pdf", 2)]
    assert result.stdout.startswith("<!--")


def test_ground_text_and_jsonl(k2, corpus, fixed_answers):
    png = corpus / "img" / "a.png"
    result = kosmos("ground", png, corpus / "img" / "b.jpg", "--model", k2, *FAST)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [Path(m.group(1)).name for m in map(PAGE_COMMENT.match, lines) if m] == ["a.png", "b.jpg"]
    assert [ln for ln in lines if not ln.startswith("<!--")] == ["An image of a snowman warming himself by a fire."] * 2
    result = kosmos("ground", png, "<grounding> A photo of", "--model", k2, "--format", "jsonl", *FAST)
    assert result.exit_code == 0, result.stderr
    (rec,) = jsonl(result.stdout)
    check_record(rec, "ground")
    assert rec["raw"].startswith("<grounding> A photo of")  # the positional prompt was used
    assert [e["text"] for e in rec["entities"]] == ["a snowman", "a fire"]
    assert (rec["width"], rec["height"]) == (64, 48)


def test_ground_random_model_output_keeps_schema(k2, corpus):
    result = kosmos("ground", corpus / "img" / "a.png", "--model", k2, "--format", "jsonl", *FAST)
    assert result.exit_code == 0, result.stderr
    (rec,) = jsonl(result.stdout)
    check_record(rec, "ground")
    assert rec["raw"].startswith("<grounding> An image of")


# --------------------------------------------------------------------------------------------------
# -o DIR: layout, overlays, resume, interruption
# --------------------------------------------------------------------------------------------------


def test_output_dir_mirrors_subfolders(k25, tmp_path, fixed_answers):
    src = tmp_path / "in"
    make_image_pdf(src / "a" / "doc.pdf", 2)
    make_image_pdf(src / "b" / "doc.pdf", 1)
    (src / "c" / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 48), "white").save(src / "c" / "sub" / "pic.png")
    out = tmp_path / "out"
    result = kosmos("ocr", src, "-o", out, "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""  # with -o nothing goes to stdout
    visible = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and ".kosmos" not in p.parts)
    assert visible == ["a/doc.json", "a/doc.txt", "b/doc.json", "b/doc.txt", "c/sub/pic.json", "c/sub/pic.txt"]
    doc = json.loads((out / "a" / "doc.json").read_text())
    assert doc["task"] == "ocr" and [p["page"] for p in doc["pages"]] == [1, 2]
    for page in doc["pages"]:
        check_record(page, "ocr")
    txt = (out / "a" / "doc.txt").read_text()
    assert txt.count(PAGE_SEPARATOR) == 1
    for page_text in txt.split(PAGE_SEPARATOR):
        assert len(page_text.splitlines()) == 2 and all(OCR_LINE.match(ln) for ln in page_text.splitlines())

    # Two doc.pdf named explicitly (same stem) still don't collide.
    out2 = tmp_path / "out2"
    result = kosmos("md", src / "a" / "doc.pdf", src / "b" / "doc.pdf", "-o", out2, "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.relative_to(out2).as_posix() for p in out2.glob("*/*.md")) == ["a/doc.md", "b/doc.md"]
    md = (out2 / "a" / "doc.md").read_text()
    assert "<!-- page 1 -->" in md and "<!-- page 2 -->" in md


def test_overlays_have_the_page_size(k25, k2, tmp_path, fixed_answers):
    pdf = make_image_pdf(tmp_path / "doc.pdf", 2)
    out = tmp_path / "out"
    result = kosmos("ocr", pdf, "-o", out, "--overlay", "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    pages = json.loads((out / "doc.json").read_text())["pages"]
    for page in pages:
        overlay = out / f"doc.overlay-{page['page']:04d}.png"
        with Image.open(overlay) as im:
            assert im.format == "PNG" and im.size == (page["width"], page["height"])
            assert len(im.convert("RGB").getcolors(1 << 16)) > 3  # boxes drawn on the page

    png = tmp_path / "pic.png"
    Image.new("RGB", (96, 64), "white").save(png)
    out = tmp_path / "ground"
    result = kosmos("ground", png, "-o", out, "--overlay", "--model", k2, *FAST)
    assert result.exit_code == 0, result.stderr
    assert (out / "pic.txt").read_text().strip() == "An image of a snowman warming himself by a fire."
    assert json.loads((out / "pic.json").read_text())["pages"][0]["entities"]
    with Image.open(out / "pic.overlay-0001.png") as im:
        assert im.size == (96, 64)


def test_resume_skips_finished_pages(k25, tmp_path):
    pdf = make_image_pdf(tmp_path / "doc.pdf", 3)
    out = tmp_path / "out"
    args = ("md", pdf, "-o", out, "--model", k25, *FAST)
    assert kosmos(*args).exit_code == 0
    states = [state_file(out, "md", "doc", p) for p in (1, 2, 3)]
    assert all(s.is_file() for s in states) and (out / "doc.md").is_file()
    old = 1_000_000_000
    for path in [*states, out / "doc.md"]:
        os.utime(path, (old, old))

    # A lost page: only it is redone.
    states[1].unlink()
    result = kosmos(*args)
    assert result.exit_code == 0, result.stderr
    assert re.search(r"1 page in .*; 2 already done", result.stderr), result.stderr
    assert [s.stat().st_mtime for s in states] == [old, states[1].stat().st_mtime, old]
    assert states[1].stat().st_mtime > old
    assert (out / "doc.md").stat().st_mtime == old  # reassembled: the same content, so left untouched
    assert (out / "doc.md").read_text().count("<!-- page") == 3

    # Lost document files: rebuilt from the stored pages, no page redone.
    (out / "doc.md").unlink()
    for path in states:
        os.utime(path, (old, old))
    result = kosmos(*args)
    assert result.exit_code == 0, result.stderr
    assert re.search(r"0 pages in .*; 3 already done", result.stderr), result.stderr
    assert [s.stat().st_mtime for s in states] == [old] * 3
    assert (out / "doc.md").read_text().count("<!-- page") == 3

    # --overwrite redoes everything.
    result = kosmos(*args, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert "3 pages in" in result.stderr and "already done" not in result.stderr
    assert [s.stat().st_mtime for s in states] == [old] * 3  # recomputed, identical: left untouched

    # --quiet: no summary.
    result = kosmos(*args, "--quiet")
    assert result.exit_code == 0 and result.stderr == ""


def test_interrupted_write_leaves_no_partial_files_and_resumes(k25, tmp_path, monkeypatch):
    pdf = make_image_pdf(tmp_path / "doc.pdf", 3)
    out = tmp_path / "out"
    real_open = atomic.atomic_open
    calls = []

    def interrupted_write(path, data):
        calls.append(path)
        with real_open(path) as f:
            f.write(data[: len(data) // 2])
            if len(calls) == 2:  # Ctrl-C halfway through the second file
                raise KeyboardInterrupt
            f.write(data[len(data) // 2:])

    monkeypatch.setattr(atomic, "atomic_write_bytes", interrupted_write)
    result = kosmos("md", pdf, "-o", out, "--model", k25, *FAST)
    assert result.exit_code == 130
    assert "interrupted" in result.stderr
    assert_no_temp_files(out)
    assert sorted(p.name for p in (out / ".kosmos" / "md" / "doc").iterdir()) == ["0001.json"]
    assert json.loads(state_file(out, "md", "doc", 1).read_text())["page"] == 1
    assert not (out / "doc.md").exists()

    monkeypatch.undo()
    result = kosmos("md", pdf, "-o", out, "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    assert "2 pages in" in result.stderr and "1 already done" in result.stderr
    assert (out / "doc.md").read_text().count("<!-- page") == 3
    assert_no_temp_files(out)


def test_interrupted_model_run(k25, tmp_path, monkeypatch):
    from kosmos_cli.tasks import TASKS, markdown

    seen = []

    def interrupt_on_second_page(raw, model_size, page_size, scores):
        seen.append(raw)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return markdown.page_fields(raw, model_size, page_size)

    monkeypatch.setitem(TASKS, "md", dataclasses.replace(TASKS["md"], parse=interrupt_on_second_page))
    pdf = make_image_pdf(tmp_path / "doc.pdf", 3)
    out = tmp_path / "out"
    result = kosmos("md", pdf, "-o", out, "--overlay", "--model", k25, *FAST)
    assert result.exit_code == 130
    assert_no_temp_files(out)
    assert sorted(p.name for p in (out / ".kosmos" / "md" / "doc").iterdir()) == ["0001.json"]
    assert not (out / "doc.md").exists()


# --------------------------------------------------------------------------------------------------
# Exit codes and bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--pages", "0"], "--pages"),
    (["--pages", "3-1"], "--pages"),
    (["--pages", "x"], "--pages"),
    (["--format", "xml"], "--format"),
    (["--overlay"], "-o"),
    (["--overwrite"], "-o"),
    (["--batch-size", "0"], "--batch-size"),
    (["--dpi", "5"], "--dpi"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_usage_errors_exit_2(k25, png, args, message):
    result = kosmos("ocr", png, "--model", k25, *args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert message in result.stderr and result.stdout == ""


def test_an_unknown_attention_choice_is_a_usage_error(k25, png, monkeypatch):
    monkeypatch.setenv("KOSMOS_ATTENTION", "flash")
    result = kosmos("ocr", png, "--model", k25)
    assert result.exit_code == 2 and result.stdout == ""
    assert "KOSMOS_ATTENTION='flash': use one of auto, sdpa, flex" in result.stderr


def test_nothing_to_do_exits_2(k25):
    assert kosmos("ocr").exit_code == 2  # no INPUT at all
    result = kosmos("ocr", "-", "--model", k25, input="\n")  # stdin with no paths
    assert result.exit_code == 2 and "no supported input files" in result.stderr


@pytest.mark.parametrize("device", ["cpu", "cpu,cpu"])  # in process, and in two worker processes
def test_ground_with_a_kosmos25_model_is_a_usage_error(k25, png, device):
    result = kosmos("ground", png, "--model", k25, "--device", device, "-q", *FAST)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1:] == [
        f"kosmos: `kosmos ground` needs a kosmos-2 model, but {k25} is kosmos-2.5"]


def _bad_inputs(folder: Path, good_png: Path) -> dict[str, tuple[Path, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    corrupt = folder / "corrupt.pdf"
    corrupt.write_bytes(b"%PDF-1.4\n1 0 obj garbage\n%%EOF\n")
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    data = good_png.read_bytes()
    truncated = folder / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    text = folder / "notes.txt"
    text.write_text("hello")
    return {
        "corrupt pdf": (corrupt, "corrupt"),
        "empty file": (empty, "empty file"),
        "truncated png": (truncated, "truncated"),
        "encrypted pdf": (make_pdf(folder / "locked.pdf", 2, user_password="secret"), "--password"),
        "unsupported extension": (text, "unsupported file type '.txt'"),
        "missing path": (folder / "missing.png", "no such file"),
        "decompression bomb": (png_header_only(folder / "bomb.png", 30_000, 30_000), "decompression bomb"),
    }


@pytest.mark.parametrize("kind", ["corrupt pdf", "empty file", "truncated png", "encrypted pdf",
                                  "unsupported extension", "missing path", "decompression bomb"])
def test_bad_input_is_reported_and_the_rest_is_processed(k25, png, tmp_path, kind):
    bad, reason = _bad_inputs(tmp_path / "bad", png)[kind]
    result = kosmos("md", bad, png, "--model", k25, "--format", "jsonl", *FAST)
    assert result.exit_code == 1, result.stderr
    assert f"kosmos: {bad}: " in result.stderr and reason in result.stderr, result.stderr
    records = jsonl(result.stdout)
    assert [r["source"] for r in records if r["error"] is None] == [str(png)]
    assert all(r["source"] == str(bad) and reason in r["error"] for r in records if r["error"] is not None)


def test_bad_inputs_with_output_dir(k25, png, tmp_path):
    _bad_inputs(tmp_path / "in", png)
    shutil.copy(png, tmp_path / "in" / "good.png")
    out = tmp_path / "out"
    result = kosmos("ocr", tmp_path / "in", "-o", out, "--model", k25, *FAST)
    assert result.exit_code == 1
    for name in ("corrupt.pdf", "empty.png", "truncated.png", "locked.pdf", "bomb.png"):
        assert name in result.stderr
    assert "problems in 5 inputs" in result.stderr
    assert (out / "good.txt").exists() and (out / "good.json").exists()


def test_encrypted_pdf_with_password(k25, tmp_path):
    pdf = make_pdf(tmp_path / "locked.pdf", 2, user_password="secret")
    result = kosmos("md", pdf, "--password", "secret", "--model", k25, "--format", "jsonl", *FAST)
    assert result.exit_code == 0, result.stderr
    assert [r["page"] for r in jsonl(result.stdout)] == [1, 2]
    result = kosmos("md", pdf, "--password", "wrong", "--model", k25, *FAST)
    assert result.exit_code == 1 and "password is wrong" in result.stderr


def test_unreadable_path(k25, png, tmp_path, monkeypatch):
    secret = tmp_path / "secret.png"
    shutil.copy(png, secret)
    secret.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make open() refuse as it would for a user
        def refusing_open(path, *args, **kwargs):
            if Path(path) == secret:
                raise PermissionError(13, "Permission denied", str(path))
            return open(path, *args, **kwargs)

        monkeypatch.setattr(documents, "open", refusing_open, raising=False)
    try:
        result = kosmos("md", secret, png, "--model", k25, "--format", "jsonl", *FAST)
    finally:
        secret.chmod(0o644)
    assert result.exit_code == 1
    assert f"{secret}: permission denied" in result.stderr
    assert [(r["source"], r["error"]) for r in jsonl(result.stdout)] == [(str(secret), "permission denied"), (str(png), None)]


def test_unexpected_error_is_one_line_unless_debug(k25, png, monkeypatch):
    from kosmos_cli.tasks import TASKS

    def broken(raw, model_size, page_size, scores):
        raise ZeroDivisionError("boom")

    monkeypatch.setitem(TASKS, "md", dataclasses.replace(TASKS["md"], parse=broken))
    result = kosmos("md", png, "--model", k25, *FAST)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"kosmos: running {k25} on cpu in float32, eager decode step",
        "kosmos: error: ZeroDivisionError: boom (run with --debug for the traceback)"]
    result = CliRunner().invoke(app, ["md", str(png), "--model", k25, "--debug", *FAST])
    assert isinstance(result.exception, ZeroDivisionError)  # --debug lets the traceback through


# --------------------------------------------------------------------------------------------------
# The installed `kosmos` command
# --------------------------------------------------------------------------------------------------

@needs_script
def test_script_help():
    for args in ([], ["--help"], ["md", "--help"], ["ocr", "--help"], ["ground", "--help"]):
        proc = run_kosmos(*args)
        assert proc.returncode in ((0,) if args else (0, 2)), proc.stderr
        assert "Usage" in proc.stdout + proc.stderr
    proc = run_kosmos("md", "--help")
    for option in ("--model", "--pages", "--dpi", "--format", "--overlay", "--overwrite", "--password", "--quiet"):
        assert option in proc.stdout


@needs_script
def test_script_stdin_jsonl_stdout_holds_only_results(k25, corpus):
    stdin = f"{corpus / 'img' / 'c.tiff'}\n{corpus / 'docs' / 'report.pdf'}\n"
    proc = run_kosmos("ocr", "-", "--model", k25, "--format", "jsonl", *FAST, input=stdin)
    assert proc.returncode == 0, proc.stderr
    records = jsonl(proc.stdout)
    assert [(Path(r["source"]).name, r["page"]) for r in records] == [
        ("c.tiff", 1), ("c.tiff", 2), ("c.tiff", 3), ("report.pdf", 1), ("report.pdf", 2)]
    for rec in records:
        check_record(rec, "ocr")
    assert "Traceback" not in proc.stderr and "4 pages" not in proc.stdout
    assert re.search(r"5 pages in", proc.stderr)


@needs_script
def test_script_bad_input_exit_1_no_traceback(k25, tmp_path, png):
    locked = make_pdf(tmp_path / "locked.pdf", 1, user_password="pw")
    proc = run_kosmos("md", locked, png, "--model", k25, *FAST)
    assert proc.returncode == 1
    assert f"{locked}: PDF is encrypted; pass --password" in proc.stderr
    assert "Traceback" not in proc.stderr


@needs_script
def test_script_missing_weights(tmp_path, png):
    proc = run_kosmos("md", png, "--model", "/nonexistent/dir")
    assert proc.returncode not in (0, 2) and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "/nonexistent/dir" in line

    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub")}
    proc = run_kosmos("md", png, "--model", "someorg/somerepo", env=env)
    assert proc.returncode not in (0, 2) and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "someorg/somerepo" in line and "not in the Hugging Face cache" in line
    assert "HF_HUB_OFFLINE" in line and "--model DIR" in line  # how to fix it


# --------------------------------------------------------------------------------------------------
# examples/
# --------------------------------------------------------------------------------------------------


def test_examples_are_small_and_real():
    import pypdfium2 as pdfium

    pdf, receipt = EXAMPLES / "sample.pdf", EXAMPLES / "receipt.png"
    assert pdf.stat().st_size < 100_000 and receipt.stat().st_size < 100_000
    assert (EXAMPLES / "README.md").is_file()
    doc = pdfium.PdfDocument(str(pdf))
    try:
        assert len(doc) == 2
        text = doc[0].get_textpage().get_text_range()
        assert "INVOICE" in text and "Total" in text  # a real text layer
    finally:
        doc.close()


def test_readme_commands_run_on_the_examples(k25, tmp_path):
    result = kosmos("md", EXAMPLES / "sample.pdf", "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    comments = [m for m in map(PAGE_COMMENT.match, result.stdout.splitlines()) if m]
    assert [int(m.group(2)) for m in comments] == [1, 2]

    result = kosmos("md", EXAMPLES / "sample.pdf", "--model", k25, "--format", "jsonl", *FAST)
    records = jsonl(result.stdout)
    assert [(r["page"], r["width"], r["height"]) for r in records] == [(1, 1700, 2200), (2, 1700, 2200)]

    result = kosmos("ocr", EXAMPLES / "receipt.png", "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    assert all(OCR_LINE.match(ln) for ln in result.stdout.splitlines() if ln)  # random weights: maybe no line
    result = kosmos("ocr", EXAMPLES / "receipt.png", "--model", k25, "--format", "jsonl", *FAST)
    (rec,) = jsonl(result.stdout)
    check_record(rec, "ocr")
    with Image.open(EXAMPLES / "receipt.png") as im:
        assert (rec["width"], rec["height"]) == im.size


def test_failed_inputs_are_jsonl_records_too(k25, png, tmp_path):
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4 not really")
    result = kosmos("md", png, broken, "--model", k25, "--max-new-tokens", "4", "-f", "jsonl")
    assert result.exit_code == 1
    good, bad = jsonl(result.stdout)
    assert good["error"] is None and good["source"] == str(png)
    assert bad["source"] == str(broken) and bad["page"] == 0 and bad["error"] and bad["task"] == "md"
    assert str(broken) in result.stderr


def test_ask_uses_the_chat_prompt(k25, png, monkeypatch):
    from kosmos_cli import pipeline
    from kosmos_cli.processing.kosmos2_5 import chat_prompt

    prompts = []
    real = pipeline.transcribe

    def spy(engine, task, items, *, prompt=None, **kwargs):
        prompts.append(prompt)
        return real(engine, task, items, prompt=prompt, **kwargs)

    monkeypatch.setattr(pipeline, "transcribe", spy)
    result = kosmos("md", png, "--ask", "What is the total?", "--model", k25, "--max-new-tokens", "4")
    assert result.exit_code == 0, result.stderr
    assert prompts == [chat_prompt("What is the total?")]


def test_compile_flag_reaches_the_engine(k25, png, monkeypatch):
    from kosmos_cli import engine as engine_module

    seen = []
    real = engine_module.load
    monkeypatch.setattr(engine_module, "load", lambda *a, **k: seen.append(k["compile"]) or real(*a, **{**k, "compile": False}))
    for flag, expected in ((None, "auto"), ("--compile", True), ("--no-compile", False)):
        args = ["md", png, "--model", k25, "--max-new-tokens", "2"] + ([flag] if flag else [])
        assert kosmos(*args).exit_code == 0
        assert seen[-1] == expected


def test_progress_bar_on_a_terminal_keeps_results_on_stdout(k25, png):
    """With stderr on a terminal the rich progress bar draws there, and results still go to stdout."""
    import pty

    primary, secondary = pty.openpty()
    proc = subprocess.run(
        [shutil.which("kosmos"), "md", str(png), str(png), "--model", k25, "--max-new-tokens", "3", "-f", "jsonl"],
        stdout=subprocess.PIPE, stderr=secondary, timeout=120,
    )
    os.close(secondary)
    terminal = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:
            break
        if not chunk:
            break
        terminal += chunk
    os.close(primary)
    assert proc.returncode == 0
    assert len(jsonl(proc.stdout.decode())) == 1  # the same file twice is one input
    assert b"pages" in terminal and b"kosmos: 1 page in" in terminal
    assert b'"task": "md"' not in terminal
