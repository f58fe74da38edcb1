"""`kosmos serve --device cpu,cpu`: one worker process a device behind one server (`WorkerPool`, the
serving side of the multi-device driver). Through a real server, the command's `--server` output is
byte for byte a local run's with the same slots, and SIGTERM leaves no worker behind; the pool spreads
pages over its workers, never delivers a cancelled page, starts a worker that dies again and runs its
pages again each alone (a page in flight on two dying workers fails, and with no worker left pages
fail at once); a model that loads in no worker ends the command as a run would."""

import os
import queue
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from kosmos_cli.distributed.pool import WorkerPool
from kosmos_cli.distributed.processes import CRASHED_TWICE
from kosmos_cli.distributed.worker import EngineSpec, PageRef
from kosmos_cli.engine import describe
from kosmos_cli.pages import iter_pages
from tests.helpers.cli import kosmos, needs_script
from tests.helpers.images import noise_image
from tests.helpers.pdfs import make_image_pdf
from tests.helpers.server import start_server

TEXT = "ab\ncd ef\ngh"  # what the scripted checkpoint writes on any page
WAIT = 120


def workers_of(pid: int) -> list[int]:
    """The worker processes of process ``pid`` (not multiprocessing's resource tracker, which ends
    in its own time once its parent has)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(child) for child in f.read().split()]
    return [child for child in children if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@needs_script
def test_a_server_on_two_devices_answers_as_a_local_run(scripted, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    noise_image(64, 48, seed=3).save(folder / "scan.png")
    make_image_pdf(folder / "doc.pdf", 3)
    server, url = start_server("--model", scripted, "--device", "cpu,cpu", "--batch-size", "1")
    workers = workers_of(server.pid)
    try:
        assert len(workers) == 2
        local = kosmos("ocr", folder, "--model", scripted, "--device", "cpu", "--batch-size", "1", "-f", "jsonl")
        remote = kosmos("ocr", folder, "--server", url, "-f", "jsonl")
        assert remote.exit_code == local.exit_code == 0, remote.stderr
        assert remote.stdout == local.stdout and len(local.stdout.splitlines()) == 4

        def ask(task: str):
            with open(folder / "doc.pdf", "rb") as f:
                return httpx.post(f"{url}/v1/{task}", files={"file": ("doc.pdf", f)}, data={"dpi": "72"}, timeout=WAIT)

        with ThreadPoolExecutor(6) as side_by_side:
            answers = list(side_by_side.map(ask, ["ocr", "md"] * 3))
        assert [a.status_code for a in answers] == [200] * 6
        assert all(len(a.text.splitlines()) == 3 for a in answers)
        assert "kosmos_slots 2.0" in httpx.get(f"{url}/metrics").text  # one a worker
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=WAIT)
    assert server.returncode == 0, stderr
    assert stderr.count(f"running {scripted} on cpu") == 2 and "Traceback" not in stderr
    assert not [pid for pid in workers if alive(pid)]


def test_a_model_that_loads_in_no_worker_ends_the_command(scripted, tmp_path):
    broken = tmp_path / "no-weights"
    shutil.copytree(scripted, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    result = kosmos("serve", "--model", broken, "--device", "cpu,cpu", "--port", "1")
    assert result.exit_code == 1
    assert f"cannot load model {broken}" in result.stderr and "Traceback" not in result.stderr


class Pool:
    """A WorkerPool of two one-slot workers on the scripted checkpoint, and what it delivers."""

    def __init__(self, model, tmp_path, pages: int):
        self.delivered: queue.Queue = queue.Queue()
        self.log: list[str] = []
        checkpoint = describe(str(model))
        self.pool = WorkerPool([EngineSpec(str(model), "cpu", compile=False)] * 2, slots=1,
                               max_prompt_tokens=checkpoint.prompt_length("<ocr>"), max_new_tokens=64,
                               deliver=lambda key, result: self.delivered.put((key, result)), log=self.log.append)
        pdf = make_image_pdf(tmp_path / "doc.pdf", pages)
        self.refs = [PageRef.of(job, 72, None, "ocr", "<ocr>", 64) for job in iter_pages([pdf], dpi=72, render=False)]

    def results(self, count: int) -> dict:
        got = dict(self.delivered.get(timeout=WAIT) for _ in range(count))
        assert len(got) == count
        return got


@pytest.fixture
def pool(scripted, tmp_path):
    made = Pool(scripted, tmp_path, 6)
    yield made
    made.pool.close(timeout=WAIT)


def test_pages_spread_over_the_workers_and_cancelled_ones_never_come(pool):
    for key, ref in enumerate(pool.refs):
        pool.pool.put(key, ref)
    results = pool.results(6)
    assert sorted(results) == list(range(6))
    assert all(r.error is None and r.text == TEXT and r.page == k + 1 for k, r in results.items())
    assert [worker.pages for worker in pool.pool.workers] == [3, 3]

    for key, ref in enumerate(pool.refs[:4], start=10):
        pool.pool.put(key, ref)
    pool.pool.cancel(10)
    pool.pool.cancel(13)
    assert sorted(pool.results(2)) == [11, 12]
    time.sleep(1)  # the cancelled pages would have come by now
    assert pool.delivered.empty() and len(pool.pool) == 0
    assert all(not worker.inflight for worker in pool.pool.workers)


def wait_until(condition, seconds: float = WAIT) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_worker_that_dies_is_started_again_and_its_pages_run_again_alone(pool, monkeypatch):
    first, second = pool.pool.workers
    for worker in (first, second):
        os.kill(worker.process.pid, signal.SIGSTOP)  # each holds the pages it is given until it is killed
    for key, ref in enumerate(pool.refs[:4]):
        pool.pool.put(key, ref)
    assert len(first.inflight) == len(second.inflight) == 2
    os.kill(first.process.pid, signal.SIGKILL)
    wait_until(lambda: first.state == "dead")
    # Its two pages wait to run alone: not beside the two the second worker holds. Had they been sent
    # there, the second worker's death would now be their second, and they would fail.
    assert len(second.inflight) == 2
    os.kill(second.process.pid, signal.SIGKILL)
    results = pool.results(4)
    assert all(r.error is None and r.text == TEXT for r in results.values())
    assert sum("pages in flight run again, each alone; starting it again" in line for line in pool.log) == 2
    wait_until(lambda: pool.pool.slots == 2)  # both devices have a worker again

    # A page in flight on a second worker that dies is the culprit; a device started again too often
    # stays dead, and with no worker left pages fail at once.
    import kosmos_cli.distributed.pool as module

    monkeypatch.setattr(module, "RESTARTS", 0)
    third = next(w for w in pool.pool.workers if w.state == "running")
    os.kill(third.process.pid, signal.SIGSTOP)
    pool.pool._crashes[20] = 1  # as if it had been in flight on a worker that died before
    pool.pool._send(third, 20, pool.refs[0])
    os.kill(third.process.pid, signal.SIGKILL)
    assert pool.results(1)[20].error == CRASHED_TWICE
    for worker in pool.pool.workers:
        if worker.state == "running":
            os.kill(worker.process.pid, signal.SIGKILL)
    wait_until(lambda: all(w.state == "dead" for w in pool.pool.workers))
    pool.pool.put(21, pool.refs[1])
    assert "every worker stopped" in pool.results(1)[21].error
