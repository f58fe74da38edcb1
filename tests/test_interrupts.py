"""A folder run with -o, stopped by SIGINT (Ctrl-C) or SIGKILL at a random moment or right after a
random page, then run again: the outputs equal those of a run never stopped, with no page lost,
duplicated or half-written."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers.cli import KOSMOS, needs_script
from tests.helpers.pdfs import make_image_pdf

pytestmark = needs_script


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interrupts")
    make_image_pdf(root / "a" / "report.pdf", 3)
    make_image_pdf(root / "a" / "memo.pdf", 2)
    for i, color in enumerate(["white", "red", "green"]):
        Image.new("RGB", (60 + 10 * i, 40), color).save(root / f"scan{i}.png")
    return root


def command(folder: Path, out: Path, model: str) -> list[str]:
    return [KOSMOS, "ocr", str(folder), "-o", str(out), "--model", model, "--max-new-tokens", "6",
            "--batch-size", "2", "--device", "cpu", "-q"]


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file under OUT (state included) with its bytes."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(folder, kosmos25_tied, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    started = time.monotonic()
    proc = subprocess.run(command(folder, out, str(kosmos25_tied)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    files = snapshot(out)
    assert sum(name.startswith(".kosmos/") for name in files) == 3 + 2 + 3  # one state file per page
    return files, time.monotonic() - started


@pytest.mark.parametrize("how, seed, when", [("SIGINT", 0, "start"), ("SIGINT", 1, "pages"),
                                             ("SIGKILL", 2, "pages"), ("SIGKILL", 3, "start")])
def test_a_stopped_run_continues_to_the_same_outputs(folder, kosmos25_tied, reference, tmp_path, how, seed, when):
    """``start``: at a random moment of the run, mostly while it starts and loads the model;
    ``pages``: right after a random number of pages (1 to 5 of 8) are written, mid-run."""
    files, duration = reference
    out = tmp_path / "out"
    rng = random.Random(seed)
    proc = subprocess.Popen(command(folder, out, str(kosmos25_tied)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if when == "start":
        # From 1.5 s: a press while the interpreter itself starts, before our code runs, is Python's to handle.
        time.sleep(rng.uniform(1.5, max(duration, 2.0)))
    else:
        written = rng.randint(1, 5)
        deadline = time.monotonic() + 120
        while len(list(out.glob(".kosmos/ocr/**/*.json"))) < written and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
    proc.send_signal(getattr(signal, how))
    _, stderr = proc.communicate(timeout=120)
    finished_first = proc.returncode == 0  # the signal came after the end: nothing to test but the re-run
    assert not (when == "pages" and finished_first), "the stop meant for mid-run came after the end"
    if how == "SIGINT" and not finished_first:
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    elif how == "SIGKILL" and not finished_first:
        assert proc.returncode == -signal.SIGKILL
    if out.exists():  # what a stop leaves is always whole: every state file a complete page
        for name, data in snapshot(out).items():
            if name.startswith(".kosmos/") and name.endswith(".json"):
                assert data == files[name], name
    again = subprocess.run(command(folder, out, str(kosmos25_tied)), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    final = snapshot(out)
    leftovers = [name for name in final if name not in files]
    if how == "SIGKILL":  # a kill can leave a temp file mid-write; nothing else
        assert all(Path(name).name.startswith(".") and name.endswith(".tmp") for name in leftovers), leftovers
    else:
        assert not leftovers
    assert {name: data for name, data in final.items() if name in files} == files
