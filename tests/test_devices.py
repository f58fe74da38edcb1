"""Several devices on one machine (`--device cpu,cpu`: two CPU worker processes): the same results as
one device, byte for byte, and no page lost or hung when workers die or the run is interrupted."""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from kosmos_cli.distributed.local import transcribe_on_devices
from kosmos_cli.distributed.processes import CRASHED_TWICE, NO_WORKER, WorkersLost
from kosmos_cli.distributed.worker import EngineSpec
from kosmos_cli.engine import pick_devices
from kosmos_cli.pages import iter_pages
from tests.helpers.cli import FAST, KOSMOS, kosmos, needs_script
from tests.helpers.pdfs import make_document_folder
from tests.helpers.workers import CrashingWorker


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = make_document_folder(tmp_path_factory.mktemp("devices"))
    return root


def test_device_lists():
    assert pick_devices("cpu,cpu", "--device") == [torch.device("cpu")] * 2
    if not torch.cuda.is_available():
        assert pick_devices("auto") == [torch.device("cpu")]
        with pytest.raises(ValueError, match="--device all: PyTorch sees no CUDA GPU"):
            pick_devices("all", "--device")
    for bad in ("cpu,auto", "cpu,", "cpu,tpu"):
        with pytest.raises(ValueError, match="--device"):
            pick_devices(bad, "--device")


def test_a_bad_device_list_is_a_usage_error(folder, k25):
    result = kosmos("ocr", folder, "--model", k25, "--device", "cpu,all")
    assert result.exit_code == 2 and "--device cpu,all" in result.stderr


@pytest.mark.parametrize("how", [["-f", "text"], ["-o", "OUT", "--overlay"]])  # JSON records: the tests below
def test_two_workers_give_what_one_device_gives(folder, k25, tmp_path, how):
    outputs = []
    for device in ("cpu", "cpu,cpu"):
        out = tmp_path / device.replace(",", "-")
        args = [a if a != "OUT" else out for a in how]
        result = kosmos("ocr", folder, "--model", k25, "--device", device, "--batch-size", "2", *FAST, *args)
        assert result.exit_code == 0, result.stderr
        files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} \
            if out.exists() else {}
        outputs.append((result.stdout, files))
    assert outputs[0] == outputs[1]
    assert "on 1 device" in result.stderr or "on 2 devices" in result.stderr  # pages per device in the summary
    if "-o" in how:
        assert sum(name.endswith(".png") for name in outputs[1][1]) == 6 + 3 + 1  # overlays from the workers' images


def _records(folder: Path, model: str, workers: int = 2, **options) -> list[dict]:
    specs = [EngineSpec(model, "cpu", "float32", False)] * workers
    pages = iter_pages(sorted(p for p in folder.rglob("*") if p.is_file()), render=False)
    runs = transcribe_on_devices(specs, "ocr", pages, dpi=72, max_new_tokens=8, batch_size=2, **options)
    return [result.to_dict() for _, result in runs if result is not None]


@pytest.fixture(scope="module")
def reference(folder, k25) -> list[dict]:
    """The records of a one-device run (in process) of what `_records` runs."""
    from kosmos_cli.pipeline import transcribe
    from kosmos_cli.engine import load
    from kosmos_cli.tasks import TASKS

    pages = iter_pages(sorted(p for p in folder.rglob("*") if p.is_file()), dpi=72)
    engine = load(k25, device="cpu", dtype="float32", compile=False)
    return [r.to_dict() for _, r in transcribe(engine, TASKS["ocr"], pages, max_new_tokens=8, batch_size=2)]


def test_a_killed_worker_loses_no_page(folder, k25, reference):
    killed = []

    def on_page(result, new_tokens, device):
        if not killed:  # the first page is in: kill one worker while it has pages in flight
            killed.append(multiprocessing.active_children()[0])
            os.kill(killed[0].pid, signal.SIGKILL)

    assert _records(folder, k25, on_page=on_page) == reference
    assert killed and multiprocessing.active_children() == []  # every worker stopped at the end


def test_a_page_that_crashes_two_workers_is_an_error_record(folder, k25, reference):
    crash = functools.partial(CrashingWorker, crash_on=frozenset({("a.pdf", 2)}))
    records = _records(folder, k25, workers=3, worker=crash)
    failed = [r for r in records if r["error"]]
    assert [(Path(r["source"]).name, r["page"], r["error"]) for r in failed] == [("a.pdf", 2, CRASHED_TWICE)]
    assert [r for r in records if not r["error"]] == [r for r in reference if (Path(r["source"]).name, r["page"]) != ("a.pdf", 2)]
    assert multiprocessing.active_children() == []


def test_when_every_worker_is_gone_the_run_stops(folder, k25):
    crash = functools.partial(CrashingWorker, crash_on=frozenset({("a.pdf", 1), ("a.pdf", 2)}))
    started = time.monotonic()
    with pytest.raises(WorkersLost, match="every worker stopped"):
        _records(folder, k25, worker=crash)
    assert time.monotonic() - started < 60 and multiprocessing.active_children() == []


def test_when_every_worker_is_gone_the_pages_done_come_out(folder, k25, reference):
    # One worker stalls on page 1 and then crashes; meanwhile the other delivers page 2 and exits with
    # later pages in flight. Page 2 finished after page 1, which never will: it must still come out.
    crash = functools.partial(CrashingWorker, crash_on=frozenset({("a.pdf", 1)}), delay=1.0,
                              exit_after=frozenset({("a.pdf", 2)}))
    delivered, records = [], []
    runs = transcribe_on_devices([EngineSpec(k25, "cpu", "float32", False)] * 2, "ocr",
                                 iter_pages(sorted(p for p in folder.rglob("*") if p.is_file()), render=False),
                                 dpi=72, max_new_tokens=8, batch_size=2, worker=crash,
                                 on_page=lambda result, tokens, device: delivered.append(result.to_dict()))
    with pytest.raises(WorkersLost, match="every worker stopped"):
        for _, result in runs:
            records.append(result.to_dict())
    assert delivered and all(r in records for r in delivered)  # every page done is out
    done = [r for r in records if not r["error"]]
    assert done == [r for r in reference if r in done]  # in input order, as a one-device run gives them
    assert {r["error"] for r in records if r["error"]} <= {NO_WORKER, CRASHED_TWICE}
    assert [(r["source"], r["page"]) for r in records] == [(r["source"], r["page"]) for r in reference[:len(records)]]
    assert multiprocessing.active_children() == []


@needs_script
def test_ctrl_c_stops_every_worker_and_a_rerun_continues(folder, k25, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "out"
    command = [KOSMOS, "ocr", str(folder), "--model", k25, "--batch-size", "1", "--max-new-tokens", "6", "-q"]
    assert subprocess.run(command + ["-o", str(reference), "--device", "cpu"], timeout=120).returncode == 0
    # A new session, signalled as a whole, as a terminal's Ctrl-C signals its foreground process group.
    proc = subprocess.Popen(command + ["-o", str(out), "--device", "cpu,cpu"], start_new_session=True,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(out.glob(".kosmos/ocr/*/*.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    deadline = time.monotonic() + 10  # dead by now; init reaps multiprocessing's resource tracker in a moment
    with pytest.raises(ProcessLookupError):  # no worker left in the group
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)
            time.sleep(0.2)
    again = subprocess.run(command + ["-o", str(out), "--device", "cpu,cpu"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert files(out) == files(reference)
