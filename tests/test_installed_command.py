"""The installed `kosmos` command on the inputs and mistakes that once aborted runs or lost output
(issue 10): each case is the console script in its own process, as a user or a script runs it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pypdfium2 as pdfium
import pytest

from kosmos_cli.cli import PDF_REQUIREMENT, RAY_REQUIREMENT
from kosmos_cli.documents import DYNAMIC_XFA_NOT_DRAWN, XFA_NOT_DRAWN
from tests.helpers.cli import FAST, KOSMOS, PAGE_COMMENT, needs_script, run_kosmos
from tests.helpers.images import make_odd_tag_tiff, write_image
from tests.helpers.pdfs import make_xfa_pdf

pytestmark = needs_script


@pytest.mark.parametrize("args, message", [
    (["-o", "/dev/null"], "-o /dev/null: not a directory"),
    (["--pages", ""], "--pages"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "int8"], "--dtype must be auto, bfloat16, float16 or float32"),
])
def test_usage_errors_exit_2_before_any_work(tmp_path, args, message):
    write_image(tmp_path / "a.png")
    result = run_kosmos("ocr", tmp_path / "a.png", "--model", tmp_path / "no-model", *args)
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""
    assert "cannot load model" not in result.stderr  # refused before the model was looked for


def test_odd_files_in_a_folder_neither_hang_nor_abort_the_run(tmp_path, k25):
    folder = tmp_path / "scans"
    write_image(folder / "good.png")
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as f:  # not UTF-8
        f.write((folder / "good.png").read_bytes())
    os.mkfifo(folder / "pipe.pdf")
    os.symlink(".", folder / "self")  # a loop for `**`
    result = run_kosmos("ocr", folder, f"{folder}/**/*.png", tmp_path / "missing.png", "-f", "jsonl",
                        "--model", k25, *FAST, env={"LC_ALL": "C.UTF-8"}, cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # the missing file
    records = [json.loads(line) for line in result.stdout.splitlines()]  # valid JSON, valid UTF-8
    sources = [Path(r["source"]).name for r in records]
    assert sorted(sources) == ["caf\\xe9.png", "good.png", "missing.png"]  # the folder and the glob: once
    missing = next(r for r in records if r["source"].endswith("missing.png"))
    assert missing["page"] == 0 and "no such file" in missing["error"]
    assert "pipe.pdf: not a regular file (named pipe), skipped" in result.stderr


def test_a_long_name_and_a_failed_page_under_o_and_a_rerun_that_writes_nothing(tmp_path, k25):
    scans, out = tmp_path / "scans", tmp_path / "out"
    long_name = "x" * 246 + ".png"  # 250 bytes: legal, but too long for "<stem>.overlay-0001.png"
    write_image(scans / long_name)
    pdf = pdfium.PdfDocument.new()
    pdf.new_page(200, 100)
    pdf.new_page(14400, 14400)  # 40000² px at 200 dpi: over the pixel limit, so page 2 fails
    pdf.save(scans / "doc.pdf")
    command = ("md", scans, "-o", out, "--overlay", "--model", k25, *FAST)
    first = run_kosmos(*command)
    assert first.returncode == 1 and "doc.pdf: page 2: 40000×40000" in first.stderr
    names = sorted(p.name for p in out.iterdir() if p.name != ".kosmos")
    assert all(len(os.fsencode(name)) <= 255 for name in names) and len(names) == 4, names
    assert "<!-- page 2: error: " in (out / "doc.md").read_text()  # the document, with a placeholder
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    again = run_kosmos(*command)
    assert again.returncode == 1  # page 2 is tried again, and fails again
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == stamps


def test_each_document_is_marked_on_stdout(tmp_path, k25):
    for name in ("a.png", "b.png", "c.png"):
        write_image(tmp_path / name)
    result = run_kosmos("md", tmp_path / "a.png", tmp_path / "b.png", "--model", k25, *FAST)
    assert result.returncode == 0, result.stderr
    marks = [line for line in result.stdout.splitlines() if PAGE_COMMENT.match(line)]
    assert marks == [f"<!-- {tmp_path / 'a.png'}, page 1 -->", f"<!-- {tmp_path / 'b.png'}, page 1 -->"]


def test_ground_reports_a_missing_file_it_could_take_for_a_prompt(tmp_path, k2):
    write_image(tmp_path / "good.png")
    result = run_kosmos("ground", "good.png", "scan 2.png", "--model", k2, *FAST, cwd=tmp_path)
    assert result.returncode == 1
    assert "scan 2.png: no such file or directory" in result.stderr
    assert result.stdout.strip()  # good.png's caption


def test_a_reader_that_leaves_ends_the_run_with_141(tmp_path, k25):
    """`kosmos ... | head -n 1` in a shell: once the reader is gone, exit 141 without an error per
    document, as other tools do."""
    for name in ("a.png", "b.png", "c.png"):
        write_image(tmp_path / name)
    # `true` leaves before the first page is out (as `head` does before the rest), so every write fails
    script = f'"{KOSMOS}" ocr "{tmp_path}" -f jsonl --model "{k25}" --max-new-tokens 8 | true; ' \
             'echo "status ${PIPESTATUS[0]}" >&2'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stderr.strip().splitlines()[-1] == "status 141"
    assert "cannot write" not in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------
# What the libraries would print: pypdfium2's XFA warning on every open of an XFA form (the listing's,
# then each worker's), Pillow's on an odd TIFF tag. The command says what matters once, in its words.
# --------------------------------------------------------------------------------------------------


def _library_noise(tmp_path):
    """Two XFA forms (3 pages, and a dynamic one of 2) and a TIFF that Pillow warns about."""
    return (make_xfa_pdf(tmp_path / "form.pdf", pages=3), make_xfa_pdf(tmp_path / "dynamic.pdf", dynamic=True, pages=2),
            make_odd_tag_tiff(tmp_path / "odd.tif"))


def _one_note_a_form(result, form, dynamic) -> None:
    """Every stderr line is ours, and the notes are one a form."""
    lines = result.stderr.splitlines()
    assert all(line.startswith("kosmos: ") for line in lines), result.stderr
    assert [line for line in lines if line.startswith("kosmos: note: ")] == [
        f"kosmos: note: {form}: {XFA_NOT_DRAWN}", f"kosmos: note: {dynamic}: {DYNAMIC_XFA_NOT_DRAWN}"]


def test_library_warnings_stay_off_stderr_and_an_xfa_form_is_one_note(tmp_path, k25):
    form, dynamic, tiff = _library_noise(tmp_path)
    quiet = run_kosmos("ocr", form, dynamic, tiff, "--model", k25, *FAST, "-q")
    assert quiet.returncode == 0 and quiet.stderr == ""
    said = run_kosmos("ocr", form, dynamic, tiff, "--model", k25, *FAST)
    assert said.returncode == 0, said.stderr
    _one_note_a_form(said, form, dynamic)


def test_an_xfa_form_is_one_note_with_two_worker_processes(tmp_path, k25):
    form, dynamic, tiff = _library_noise(tmp_path)
    result = run_kosmos("ocr", form, dynamic, tiff, "--model", k25, "--device", "cpu,cpu", "-b", "2", *FAST)
    assert result.returncode == 0, result.stderr
    assert ": cpu#" in result.stderr  # worker processes did the pages (each opened the documents it got)
    _one_note_a_form(result, form, dynamic)


@pytest.mark.parametrize("args, message", [
    (["-o", "out", "--outputs", "txt,pdf"], f'--outputs pdf needs pikepdf: pip install "{PDF_REQUIREMENT}"'),
    (["--ray"], f'--ray needs Ray: pip install "{RAY_REQUIREMENT}"'),
])
def test_a_missing_extra_is_named_as_pip_can_install_it(tmp_path, k25, args, message):
    """Without pikepdf or Ray (hidden from the command's interpreter by a sitecustomize), the hint is a
    pip command that works whatever way kosmos was installed: the package as pyproject.toml pins it."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules.update(pikepdf=None, ray=None)\n")
    write_image(tmp_path / "a.png")
    result = run_kosmos("ocr", "a.png", "--model", k25, *args, cwd=tmp_path, env={"PYTHONPATH": str(hide)})
    assert result.returncode == 2 and result.stderr == f"kosmos: {message}\n"
    assert "kosmos-transcribe" not in result.stderr and not (tmp_path / "out").exists()
