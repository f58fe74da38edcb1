"""The `kosmos` command's edges: flags checked before any work, output folder problems, failures as
records and messages, the positional prompt rule, Ctrl-C, and the version and stdout conventions."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from kosmos_cli import cli, documents
from kosmos_cli.paths import display_path
from kosmos_cli.writers.directory import OutputDir
from kosmos_cli.cli import app
from tests.helpers import ROOT
from tests.helpers.cli import (
    FAST,
    KOSMOS,
    PAGE_COMMENT,
    assert_no_temp_files,
    jsonl,
    kosmos,
    needs_script,
    state_file,
)
from tests.helpers.images import make_corrupt_g4_tiff, write_image
from tests.helpers.pdfs import make_image_pdf


@pytest.fixture
def no_work(monkeypatch) -> list:
    """Records any attempt to open an input or load a model (a usage error must come before both)."""
    from kosmos_cli import engine

    calls = []
    real_open, real_load = documents.open_document, engine.load
    monkeypatch.setattr(documents, "open_document", lambda *a, **k: calls.append(("open", a)) or real_open(*a, **k))
    monkeypatch.setattr(engine, "load", lambda *a, **k: calls.append(("load", a)) or real_load(*a, **k))
    return calls


def _comments(stdout: str) -> list[tuple[str, int]]:
    return [(m.group(1), int(m.group(2))) for m in map(PAGE_COMMENT.match, stdout.splitlines()) if m]


# --------------------------------------------------------------------------------------------------
# 13. Several documents on stdout: each one's start is marked
# --------------------------------------------------------------------------------------------------


def test_several_single_page_documents_are_marked_on_stdout(k25, tmp_path):
    a, b = write_image(tmp_path / "a.png"), write_image(tmp_path / "b.png")
    result = kosmos("md", a, b, "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    assert _comments(result.stdout) == [(str(a), 1), (str(b), 1)]
    assert result.stdout.startswith("<!--")

    result = kosmos("md", a, "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    assert "<!--" not in result.stdout


def test_the_source_comment_is_valid_utf8_for_any_file_name(k25, tmp_path):
    odd = write_image(tmp_path / os.fsdecode(b"caf\xe9.png"))
    result = kosmos("md", odd, write_image(tmp_path / "b.png"), "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    assert _comments(result.stdout)[0] == (display_path(odd), 1)


# --------------------------------------------------------------------------------------------------
# 14. -o: checked up front; a write failure fails one document
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["regular file", "/dev/null", "under a file"])
def test_output_that_is_not_a_folder_is_a_usage_error(k25, png, tmp_path, no_work, kind):
    target = {"regular file": tmp_path / "out.txt", "/dev/null": Path(os.devnull),
              "under a file": tmp_path / "out.txt" / "sub"}[kind]
    (tmp_path / "out.txt").write_text("keep me")
    result = kosmos("md", png, "-o", target, "--model", k25, *FAST)
    assert result.exit_code == 2, result.stderr
    assert result.stderr == f"kosmos: -o {target}: not a directory\n"
    assert result.stdout == "" and no_work == []
    assert (tmp_path / "out.txt").read_text() == "keep me"


def test_output_folder_without_write_permission_is_a_usage_error(k25, png, tmp_path, no_work, monkeypatch):
    from kosmos_cli.writers import atomic

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make creating a file there fail as it would for a user
        real = atomic._open_temp

        def refusing_open(tmp):
            if Path(tmp).parent == locked:
                raise PermissionError(13, "Permission denied", tmp)
            return real(tmp)

        monkeypatch.setattr(atomic, "_open_temp", refusing_open)
    try:
        result = kosmos("md", png, "-o", locked, "--model", k25, *FAST)
    finally:
        locked.chmod(0o755)
    assert result.exit_code == 2, result.stderr
    assert result.stderr == f"kosmos: -o {locked}: permission denied\n"
    assert no_work == [] and list(locked.iterdir()) == []


def test_missing_output_folders_are_created(k25, png, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    result = kosmos("md", png, "-o", out, "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    assert (out / "good.md").is_file()


def test_a_write_failure_fails_only_its_document(k25, tmp_path, monkeypatch):
    docs = [write_image(tmp_path / "in" / f"{name}.png") for name in "abc"]
    out = tmp_path / "out"
    real = OutputDir.write_page

    def full_disk_for_b(self, stem, result):
        if stem == "b":
            raise OSError(28, "No space left on device", str(self.page_file(stem, result.page)))
        return real(self, stem, result)

    monkeypatch.setattr(OutputDir, "write_page", full_disk_for_b)
    result = kosmos("md", *docs, "-o", out, "--model", k25, *FAST)
    assert result.exit_code == 1, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if "cannot write" in ln]
    assert errors == [f"kosmos: {docs[1]}: cannot write {state_file(out, 'md', 'b', 1)}: no space left on device"]
    assert "problems in 1 input" in result.stderr
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".md") == ["a.md", "c.md"]
    assert_no_temp_files(out)


# --------------------------------------------------------------------------------------------------
# 15. Input failures are JSONL records too
# --------------------------------------------------------------------------------------------------


def _bad_input(kind: str, folder: Path, monkeypatch) -> tuple[str, str]:
    """An input argument of the given kind, and a piece of the reason it fails with."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "missing file":
        return str(folder / "missing.png"), "no such file"
    if kind == "broken symlink":
        (folder / "dangling.png").symlink_to(folder / "gone.png")
        return str(folder / "dangling.png"), "broken symlink"
    if kind == "unsupported extension":
        (folder / "notes.txt").write_text("hello")
        return str(folder / "notes.txt"), "unsupported file type"
    if kind == "glob matching nothing":
        return str(folder / "*.nothing"), "no files match"
    if kind == "unreadable directory":
        closed = folder / "closed"
        write_image(closed / "inside.png")
        if os.geteuid() == 0:  # root lists anything: make the walk fail as it would for a user
            real = os.walk

            def refusing_walk(top, *args, onerror=None, **kwargs):
                if Path(top) == closed:
                    onerror(PermissionError(13, "Permission denied", str(closed)))
                    return iter(())
                return real(top, *args, onerror=onerror, **kwargs)

            monkeypatch.setattr(os, "walk", refusing_walk)
        else:
            closed.chmod(0)
        return str(closed), "permission denied"
    raise ValueError(kind)


INPUT_FAILURES = ["missing file", "broken symlink", "unsupported extension", "glob matching nothing",
                  "unreadable directory"]


@pytest.mark.parametrize("kind", INPUT_FAILURES)
def test_input_failures_are_jsonl_records(k25, png, tmp_path, monkeypatch, kind):
    bad, reason = _bad_input(kind, tmp_path / "bad", monkeypatch)
    try:
        result = kosmos("md", bad, png, "--model", k25, "-f", "jsonl", *FAST)
        alone = kosmos("md", bad, "--model", k25, "-f", "jsonl", *FAST)
    finally:
        if kind == "unreadable directory":
            Path(bad).chmod(0o755)
    assert result.exit_code == 1, result.stderr
    records = jsonl(result.stdout)
    failed = [r for r in records if r["error"] is not None]
    assert failed and records[:len(failed)] == failed  # in argument order, before the pages
    assert failed[0]["source"] == bad and reason in failed[0]["error"]
    assert all(r["page"] == 0 and r["task"] == "md" and r["model"] == k25 for r in failed)
    assert [r["source"] for r in records[len(failed):]] == [str(png)]
    assert f"kosmos: {bad}: " in result.stderr

    assert alone.exit_code == 1, alone.stderr
    assert jsonl(alone.stdout) == failed


def test_input_notes_are_neither_records_nor_failures(k25, png, monkeypatch):
    """An input the document side reports as a note (`warning=True`) is printed, not counted."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Note:
        path: str
        reason: str
        warning: bool = True

    real = cli.collect_inputs

    def with_a_note(inputs, *args, **kwargs):
        files, errors = real(inputs, *args, **kwargs)
        return files, [*errors, Note("in/pipe.pdf", "not a regular file, skipped")]

    monkeypatch.setattr(cli, "collect_inputs", with_a_note)
    result = kosmos("md", png, "--model", k25, "-f", "jsonl", *FAST)
    assert result.exit_code == 0, result.stderr
    assert "kosmos: note: in/pipe.pdf: not a regular file, skipped" in result.stderr
    assert [r["error"] for r in jsonl(result.stdout)] == [None]
    assert kosmos("md", png, "--model", k25, "-q", *FAST).stderr == ""


# --------------------------------------------------------------------------------------------------
# 16. Page selections
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pages", ["", " "])
def test_an_empty_page_selection_is_a_usage_error(k25, png, no_work, pages):
    result = kosmos("md", png, "--pages", pages, "--model", k25, *FAST)
    assert result.exit_code == 2, result.stderr
    assert "--pages" in result.stderr and result.stdout == "" and no_work == []


def test_a_selection_matching_no_page_fails_the_document(k25, tmp_path):
    pdf = make_image_pdf(tmp_path / "two.pdf", 2)
    result = kosmos("md", pdf, "--pages", "999", "--model", k25, *FAST)
    assert result.exit_code == 1, result.stderr
    assert f"kosmos: {pdf}: " in result.stderr and "note:" not in result.stderr


# --------------------------------------------------------------------------------------------------
# 17. --device and --dtype: checked before any work, in our words
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, not 'tpu'"),
    (["--device", "mps"], "--device must be auto, cpu, cuda or cuda:N, not 'mps'"),
    (["--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:N, not 'cuda:x'"),
    (["--device", ""], "--device must be auto, cpu, cuda or cuda:N, not ''"),
    (["--dtype", "int8"], "--dtype must be auto, bfloat16, float16 or float32, not 'int8'"),
])
def test_bad_device_or_dtype_is_a_usage_error(k25, png, no_work, args, message):
    result = kosmos("md", png, "--model", k25, *args, *FAST)
    assert result.exit_code == 2, result.stderr
    assert result.stderr == f"kosmos: {message}\n" and result.stdout == "" and no_work == []


def test_cuda_without_a_gpu_is_a_usage_error(k25, png, no_work, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        result = kosmos("md", png, "--model", k25, "--device", device, *FAST)
        assert result.exit_code == 2, result.stderr
        assert result.stderr == f"kosmos: --device {device}: PyTorch sees no CUDA GPU (use --device cpu)\n"
    assert no_work == []


def test_a_gpu_number_past_the_last_gpu_is_a_usage_error(k25, png, no_work, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    result = kosmos("md", png, "--model", k25, "--device", "cuda:2", *FAST)
    assert result.exit_code == 2, result.stderr
    assert result.stderr == "kosmos: --device cuda:2: PyTorch sees 2 CUDA GPUs (cuda:0 to cuda:1)\n"
    assert no_work == []


@pytest.mark.parametrize("args", [["--device", "cpu", "--dtype", "bf16"], ["--device", "cpu:0", "--dtype", "float32"]])
def test_good_device_and_dtype_spellings_run(k25, png, args):
    result = kosmos("md", png, "--model", k25, *args, *FAST)
    assert result.exit_code == 0, result.stderr


# --------------------------------------------------------------------------------------------------
# 18. -q, --version, one page prefix, displayable paths
# --------------------------------------------------------------------------------------------------


def test_quiet_hides_notes(k25, tmp_path):
    pdf = make_image_pdf(tmp_path / "two.pdf", 2)
    result = kosmos("md", pdf, "--pages", "1-3", "--model", k25, "-q", *FAST)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == "" and result.stdout


def test_version():
    result = kosmos("--version")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"kosmos {importlib.metadata.version('kosmos-transcribe')}\n"


@pytest.fixture
def page_two_fails(monkeypatch):
    """Rendering page 2 of any document fails (index 1), the other pages render as usual."""
    real = documents.Document.page

    def page(self, index, *args, **kwargs):
        if index == 1:
            raise documents.DocumentError(self.source, "cannot render this page")
        return real(self, index, *args, **kwargs)

    monkeypatch.setattr(documents.Document, "page", page)


def test_a_page_error_names_source_and_page_once(k25, tmp_path, page_two_fails):
    pdf = make_image_pdf(tmp_path / "report.pdf", 3).rename(tmp_path / os.fsdecode(b"r\xe9port.pdf"))
    result = kosmos("md", pdf, "--model", k25, *FAST)
    assert result.exit_code == 1
    errors = [ln for ln in result.stderr.splitlines() if "cannot render" in ln]
    assert errors == [f"kosmos: {display_path(pdf)}: page 2: cannot render this page"]


def test_an_input_error_names_a_displayable_path(k25, tmp_path):
    missing = tmp_path / os.fsdecode(b"caf\xe9.png")
    result = kosmos("md", missing, "--model", k25, *FAST)
    assert result.exit_code == 1
    assert result.stderr == f"kosmos: {display_path(missing)}: no such file or directory\n"
    assert "caf\\xe9.png" in result.stderr


# --------------------------------------------------------------------------------------------------
# 21. ground: the positional prompt rule
# --------------------------------------------------------------------------------------------------


def test_a_missing_file_is_never_taken_for_a_prompt(k2, png, tmp_path):
    missing = tmp_path / "scan 2.png"
    result = kosmos("ground", png, missing, "--model", k2, "-f", "jsonl", *FAST)
    assert result.exit_code == 1, result.stderr
    assert f"kosmos: {missing}: no such file or directory" in result.stderr
    good = [r for r in jsonl(result.stdout) if r["error"] is None]
    assert [r["raw"].startswith("<grounding> An image of") for r in good] == [True]


def test_a_last_argument_starting_with_a_bracket_is_the_prompt(k2, png, tmp_path, monkeypatch):
    result = kosmos("ground", png, "<grounding> A photo of", "--model", k2, "-f", "jsonl", *FAST)
    assert result.exit_code == 0, result.stderr
    (rec,) = jsonl(result.stdout)
    assert rec["raw"].startswith("<grounding> A photo of")

    # The rule does not look at the file system: an existing file named "<...>" as the last argument is
    # still the prompt, and ./<name> passes it as an input.
    odd = write_image(tmp_path / "<odd>.png")
    monkeypatch.chdir(tmp_path)
    result = kosmos("ground", png, odd.name, "--model", k2, "-f", "jsonl", *FAST)
    assert result.exit_code == 0, result.stderr
    assert [r["raw"].startswith("<odd>.png") for r in jsonl(result.stdout)] == [True]
    result = kosmos("ground", png, f"./{odd.name}", "--model", k2, "-f", "jsonl", *FAST)
    assert result.exit_code == 0, result.stderr
    assert [r["source"] for r in jsonl(result.stdout)] == [str(png), f"{odd.name}"]


def test_a_prompt_without_inputs_or_twice_is_a_usage_error(k2, png, no_work):
    result = kosmos("ground", "<grounding> A photo of", "--model", k2, *FAST)
    assert result.exit_code == 2 and "no input" in result.stderr
    result = kosmos("ground", png, "<grounding> A", "--prompt", "<grounding> B", "--model", k2, *FAST)
    assert result.exit_code == 2 and "--prompt" in result.stderr
    assert no_work == []


def test_the_prompt_rule_is_in_the_help():
    result = CliRunner().invoke(app, ["ground", "--help"], env={"COLUMNS": "2000"})
    assert "A last argument that starts with < is the prompt" in result.stdout


# --------------------------------------------------------------------------------------------------
# 23. No NumPy warning when NumPy is absent
# --------------------------------------------------------------------------------------------------


def test_no_numpy_warning_without_numpy(k25, png):
    code = ("import sys; sys.modules['numpy'] = None\n"
            "from kosmos_cli.cli import app\n"
            f"app(['md', {str(png)!r}, '--model', {k25!r}, '--max-new-tokens', '2', '-q'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout


LIBRARY_LOGS = """
import logging, sys, warnings
from kosmos_cli.report import library_output_held
{setup}
with library_output_held():
    logging.getLogger("pypdfium2._helpers.document").warning("pdfium, held")
    logging.getLogger("PIL.TiffImagePlugin").error("Pillow, held")
    logging.getLogger("pikepdf._core").warning("qpdf, held")
    logging.getLogger("mine").warning("a logger of the caller's own")
    warnings.warn_explicit("Pillow's warning, held", UserWarning, "TiffImagePlugin.py", 1, module="PIL.TiffImagePlugin")
logging.getLogger("PIL").warning("Pillow, after the run")
"""


@pytest.mark.parametrize("setup, stderr", [
    ("", ["a logger of the caller's own", "Pillow, after the run"]),  # through Python's last resort
    ("logging.basicConfig(format='%(message)s')",  # a caller's handler gets every record, as it did
     ["pdfium, held", "Pillow, held", "qpdf, held", "a logger of the caller's own", "Pillow, after the run"]),
])
def test_the_libraries_logs_are_held_only_from_the_last_resort_and_only_during_the_run(setup, stderr):
    proc = subprocess.run([sys.executable, "-c", LIBRARY_LOGS.format(setup=setup)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stderr.splitlines() == stderr, proc.stderr


# --------------------------------------------------------------------------------------------------
# 9. Ctrl-C twice: exit 130, clean stderr, nothing half-written, the re-run completes
# --------------------------------------------------------------------------------------------------


@needs_script
def test_two_ctrl_c_end_cleanly_and_the_run_resumes(k25, tmp_path):
    folder = tmp_path / "in"
    for i in range(80):
        write_image(folder / f"p{i:02d}.png", (64 + i, 48))
    out = tmp_path / "out"
    proc = subprocess.Popen([KOSMOS, "md", str(folder), "-o", str(out), "--model", k25, *FAST],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = out / ".kosmos" / "md"
    deadline = time.monotonic() + 120
    while not (state.is_dir() and any(state.rglob("*.json"))):
        assert proc.poll() is None and time.monotonic() < deadline, "no page was written"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    for bad in ("Traceback", "terminate called", "Exception ignored"):
        assert bad not in stderr
    assert "interrupted" in stderr
    assert_no_temp_files(out)
    assert len(list(out.glob("*.md"))) < 80  # it stopped early

    assert kosmos("md", folder, "-o", out, "--model", k25, *FAST).exit_code == 0
    reference = tmp_path / "reference"
    assert kosmos("md", folder, "-o", reference, "--model", k25, *FAST).exit_code == 0
    written = {p.name: p.read_text() for p in out.glob("*.md")}
    assert len(written) == 80 and written == {p.name: p.read_text() for p in reference.glob("*.md")}


def test_a_ctrl_c_swallowed_by_library_code_still_stops_the_run(k25, tmp_path, monkeypatch):
    """torch's optional NumPy import catches a KeyboardInterrupt raised inside it; the run must stop anyway."""
    from kosmos_cli import engine, interrupt

    monkeypatch.setattr(interrupt, "_pressed", threading.Event())
    real = engine.load

    def load_swallowing_ctrl_c(*args, **kwargs):
        try:
            interrupt._on_ctrl_c(signal.SIGINT, None)
        except KeyboardInterrupt:
            pass
        interrupt._on_ctrl_c(signal.SIGINT, None)  # a second press: ignored
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "load", load_swallowing_ctrl_c)
    out = tmp_path / "out"
    result = kosmos("md", make_image_pdf(tmp_path / "doc.pdf", 3), "-o", out, "--model", k25, *FAST)
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert not (out / ".kosmos").exists()


# --------------------------------------------------------------------------------------------------
# 6. A failed page: the document is still written, with a placeholder, and a re-run fills it in
# --------------------------------------------------------------------------------------------------


def test_a_failed_page_is_a_placeholder_and_a_rerun_redoes_it(k25, tmp_path, monkeypatch, page_two_fails):
    pdf = make_image_pdf(tmp_path / "doc.pdf", 3)
    out = tmp_path / "out"
    result = kosmos("md", pdf, "-o", out, "--model", k25, *FAST)
    assert result.exit_code == 1
    assert f"kosmos: {pdf}: page 2: cannot render this page" in result.stderr
    md = (out / "doc.md").read_text()
    assert "<!-- page 1 -->" in md and "<!-- page 3 -->" in md
    assert "<!-- page 2: error: cannot render this page -->" in md
    assert json.loads(state_file(out, "md", "doc", 2).read_text())["error"] == "cannot render this page"

    monkeypatch.undo()
    result = kosmos("md", pdf, "-o", out, "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    assert "1 page in" in result.stderr and "2 already done" in result.stderr
    md = (out / "doc.md").read_text()
    assert "error" not in md and [f"<!-- page {n} -->" in md for n in (1, 2, 3)] == [True] * 3
    assert_no_temp_files(out)



def test_a_corrupt_page_state_is_reported_and_the_page_redone(k25, tmp_path):
    pdf = make_image_pdf(tmp_path / "doc.pdf", 2)
    out = tmp_path / "out"
    assert kosmos("md", pdf, "-o", out, "--model", k25, *FAST).exit_code == 0
    expected = (out / "doc.md").read_text()
    state_file(out, "md", "doc", 2).write_text('{"source": "doc.pdf", "pa')  # torn by hand
    result = kosmos("md", pdf, "-o", out, "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    assert "kosmos: note: " in result.stderr and "0002.json" in result.stderr, result.stderr
    assert "1 page in" in result.stderr and "1 already done" in result.stderr
    assert (out / "doc.md").read_text() == expected
    assert json.loads(state_file(out, "md", "doc", 2).read_text())["page"] == 2


def test_decoder_warnings_are_notes_naming_the_page(k25, tmp_path):

    tiff = make_corrupt_g4_tiff(tmp_path / "fax.tif")
    result = kosmos("md", tiff, "--model", k25, *FAST)
    assert result.exit_code == 0, result.stderr
    assert f"kosmos: note: {tiff}: page 1: libtiff: Fax4Decode: Bad code word" in result.stderr
    assert kosmos("md", tiff, "--model", k25, "-q", *FAST).stderr == ""


def test_coordinates_refer_to_the_full_page_of_a_big_scan(k25, tmp_path, fixed_answers):
    """A scan larger than the working image: the model reads a smaller copy, the record keeps the
    scan's own size and its polygons are in the scan's pixels; the overlay is drawn on the copy."""
    big = write_image(tmp_path / "big.png", size=(4000, 3000))
    assert 4000 * 3000 > documents.WORK_PIXELS
    (record,) = jsonl(kosmos("ocr", big, "--model", k25, "-f", "jsonl", *FAST).stdout)
    assert (record["width"], record["height"]) == (4000, 3000)
    x0, y0, x1, _, _, y1, _, _ = record["lines"][0]["polygon"]
    assert (x0, y0) == (0, 0) and abs(x1 - 2000) <= 40 and abs(y1 - 750) <= 40  # half the width, a quarter of the height
    out = tmp_path / "out"
    assert kosmos("ocr", big, "--model", k25, "-o", out, "--overlay", *FAST).exit_code == 0
    with Image.open(out / "big.overlay-0001.png") as overlay:
        assert overlay.width * overlay.height <= documents.WORK_PIXELS
        assert abs(overlay.width / overlay.height - 4000 / 3000) < 0.01


def test_a_ctrl_c_while_the_interpreter_shuts_down_changes_nothing(k25, png):
    """The run has ended and its files are written; a press during shutdown must not turn exit 0 into a
    death by SIGINT (Python restores the default action part-way through its shutdown)."""
    code = ("import atexit, os, signal, sys\n"
            "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\n"
            "from kosmos_cli.__main__ import main\n"
            f"sys.argv = ['kosmos', 'md', {str(png)!r}, '--model', {k25!r}, '--max-new-tokens', '2', '-q']\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout
