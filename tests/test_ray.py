"""Ray (`--ray`, `transcribe_dataset`) on a local CPU cluster: the same records as a local run, page for
page; every page once when an actor is killed mid-run; records that write to Parquet; the model errors
of a local run. Each Ray run starts its actors afresh (a process, torch, the engine), so the tests
share one cluster and one local run, and start as few actors as they can."""

from __future__ import annotations

import functools
import importlib.util
import threading
import time
import types
from pathlib import Path

import pytest

from kosmos_cli.distributed.worker import Record
from kosmos_cli.documents import XFA_NOT_DRAWN
from tests.helpers.cli import FAST, jsonl, kosmos
from tests.helpers.pdfs import make_document_folder, make_xfa_pdf
from tests.helpers.workers import KilledOnceWorker, LinedWorker, with_line


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = make_document_folder(tmp_path_factory.mktemp("ray"))
    (root / "d.pdf").write_bytes(b"%PDF-1.4 broken")
    return root


@pytest.fixture(scope="module")
def local(folder, k25) -> list[dict]:
    """The JSON records of a local one-device run."""
    result = kosmos("ocr", folder, "--model", k25, "--device", "cpu", "-b", "2", "--dpi", "72", "-f", "jsonl", *FAST)
    assert result.exit_code == 1, result.stderr  # d.pdf
    return jsonl(result.stdout)


def test_without_ray_the_flag_is_a_usage_error(folder, k25, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    result = kosmos("ocr", folder, "--model", k25, "--ray")
    assert result.exit_code == 2
    assert result.stderr == 'kosmos: --ray needs Ray: pip install "ray[data]>=2.60,<2.61"\n'


def test_the_command_on_ray_gives_what_a_local_run_gives(cluster, folder, k25, local, tmp_path):
    common = ["--model", k25, "-b", "2", "--dpi", "72", *FAST]
    result = kosmos("ocr", folder, *common, "--ray", "--device", "cpu,cpu", "-f", "jsonl")
    assert result.exit_code == 1 and "d.pdf" in result.stderr
    assert jsonl(result.stdout) == local  # in input order, the failed input included
    trees = []
    for how in (["--device", "cpu"], ["--ray", "--device", "cpu"]):  # one actor: each start costs seconds
        out = tmp_path / how[0]
        assert kosmos("ocr", folder, *common, *how, "-o", out, "--review-below", "1").exit_code == 1
        trees.append({p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert trees[0] == trees[1]
    assert len(trees[1]["ocr.review.tsv"].splitlines()) == 1 + 10  # the header, every page done
    again = kosmos("ocr", folder, *common, "--ray", "-o", tmp_path / "--ray")  # resume: all done, no page redone
    assert again.exit_code == 1 and "0 pages in" in again.stderr and "10 already done" in again.stderr


def test_an_xfa_form_is_one_note_on_ray_too(cluster, k25, tmp_path):
    """The driver lists the pages (one note a document); the actor that renders them opens it again,
    and pypdfium2's warning of that open stays in the actor (documents hold it back in every process)."""
    form = make_xfa_pdf(tmp_path / "form.pdf", pages=2)
    result = kosmos("ocr", form, "--model", k25, "--ray", "--device", "cpu", "--dpi", "72", *FAST)
    assert result.exit_code == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "note" in line] == [f"kosmos: note: {form}: {XFA_NOT_DRAWN}"]


@pytest.mark.parametrize("case", ["wrong model", "no model"])
def test_a_model_that_does_not_fit_or_load_is_one_line_on_ray_too(cluster, k25, folder, tmp_path, case):
    """What a one-device run says (exit 2 for a model that does not fit the task, 1 for one that does
    not load), from an actor that could not load its engine: no Ray error, no traceback."""
    task, model, code = ("ground", k25, 2) if case == "wrong model" else ("ocr", tmp_path, 1)
    args = [task, folder / "c.png", "--model", model, "--device", "cpu", "-q", *FAST]
    here, on_ray = kosmos(*args), kosmos(*args, "--ray")
    assert here.exit_code == on_ray.exit_code == code
    assert on_ray.stdout == ""
    assert on_ray.stderr.strip().splitlines() == here.stderr.strip().splitlines()[-1:]
    if case == "wrong model":
        assert on_ray.stderr == f"kosmos: `kosmos ground` needs a kosmos-2 model, but {k25} is kosmos-2.5\n"
    else:
        assert on_ray.stderr.startswith(f"kosmos: cannot load model {tmp_path}: ")


def _dataset(ray, folder: Path, k25: str, **options):
    """`transcribe_dataset` over a Dataset of the folder's paths in one block: one listing task (a
    block a path, the default for a list, would start a worker process for each)."""
    from kosmos_cli.distributed.ray_data import transcribe_dataset

    paths = [{"path": str(p)} for p in sorted(folder.rglob("*")) if p.is_file()]
    return transcribe_dataset(ray.data.from_items(paths, override_num_blocks=1), "ocr", model=k25, dpi=72,
                              batch_size=2, max_new_tokens=8, dtype="float32", compile=False, **options)


def _sorted(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda row: (row["source"], row["page"]))


def test_an_actor_killed_mid_run_loses_no_page(cluster, folder, k25, local, tmp_path):
    """`ray.kill` from the driver on an actor with a page in flight: Ray restarts it and retries its
    batches, and the Dataset holds every page once, as the local run has it."""
    handle = tmp_path / "handle"
    killed = []

    def kill_when_ready() -> None:
        deadline = time.monotonic() + 120
        while not handle.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if handle.exists():
            cluster.kill(cluster.cloudpickle.loads(handle.read_bytes()), no_restart=False)
            killed.append(True)

    killer = threading.Thread(target=kill_when_ready, daemon=True)
    killer.start()
    worker = functools.partial(KilledOnceWorker, dies_on=("a.pdf", 4), handle=str(handle))
    rows = _dataset(cluster, folder, k25, workers=1, worker=worker).take_all()
    killer.join(5)
    assert killed  # an actor was killed while a.pdf page 4 was in flight
    assert _sorted(rows) == _sorted(local)  # every page once (d.pdf as one row, page 0, with error)


def test_records_with_and_without_lines_and_failures_write_to_parquet(cluster, folder, k25, local, tmp_path):
    import pyarrow.parquet

    from kosmos_cli.distributed.ray_data import record_schema

    _dataset(cluster, folder, k25, workers=1, worker=LinedWorker).write_parquet(str(tmp_path / "out"))
    table = pyarrow.parquet.read_table(tmp_path / "out")
    assert table.schema.equals(record_schema())
    expected = [{**row, "lines": [with_line(row["page"])] if row["page"] % 2 else []} for row in local]
    assert _sorted(table.to_pylist()) == _sorted(expected)
    assert {bool(row["lines"]) for row in expected if not row["error"]} == {True, False}
    assert [row["page"] for row in expected if row["error"]] == [0]


def test_the_schema_holds_every_task_s_record():
    """No field of an OCR or grounding record is lost or retyped on its way to Arrow."""
    import pyarrow

    from kosmos_cli.distributed.ray_data import record_schema
    from kosmos_cli.results import PageResult

    ocr = PageResult("a.pdf", 1, "ocr", "m", 100, 50, "Total", [with_line(1)], raw="<ocr>").to_dict()
    entity = {"text": "a snowman", "span": [12, 21], "boxes": [[0.39, 0.05, 0.98, 0.83]],
              "pixel_boxes": [[39, 2, 98, 41]], "confidence": 0.125}
    ground = PageResult("b.png", 1, "ground", "m", 100, 50, "An image of a snowman", entities=[entity]).to_dict()
    failed = PageResult.failed("c.pdf", 0, "md", "m", "cannot open").to_dict()
    assert record_schema().names == list(ocr)
    rows = [ocr, ground, failed]
    assert pyarrow.Table.from_pylist(rows, schema=record_schema()).to_pylist() == rows


class _Paced:
    """A stand-in Worker for `_Stream`: page p takes ``seconds[p]``, all pages at once, and come out
    as they end; it counts the batches it ran."""

    def __init__(self, seconds: dict[int, float]):
        self.seconds, self.batches, self.finished, self.slots = seconds, 0, [], 4

    def run(self, refs, ordered: bool = True):
        assert not ordered
        self.batches += 1
        running: list[tuple[float, int, int]] = []  # (end, key, page)

        def ended(until: float):
            while running and running[0][0] <= until:
                end, key, page = running.pop(0)
                time.sleep(max(0.0, end - time.monotonic()))
                self.finished.append(page)
                yield Record(key, None, None, 0)

        for key, page in refs:
            running = sorted(running + [(time.monotonic() + self.seconds[page], key, page)])
            yield from ended(time.monotonic())
        yield from ended(float("inf"))


def test_concurrent_calls_feed_one_batch_and_a_long_page_holds_back_its_own_call_only():
    from kosmos_cli.distributed.ray_data import _Stream

    worker = _Paced({1: 1.2, 2: 0.0, 3: 0.0, 4: 0.0})
    stream = _Stream(worker, wait=1.0)  # the second call comes well within it, even on a busy machine
    returned = {}

    def call(name: str, pages: list[int]) -> None:
        records = stream.run([(k, page) for k, page in enumerate(pages)])
        returned[name] = (time.monotonic(), sorted(record.key for record in records))

    first = threading.Thread(target=call, args=("long", [1, 2]))
    first.start()
    time.sleep(0.05)
    call("short", [3, 4])  # joins the batch the long page is in, and returns before it
    first.join()
    assert worker.batches == 1
    assert returned["short"][1] == returned["long"][1] == [0, 1]
    assert returned["short"][0] < returned["long"][0]
    assert sorted(worker.finished) == [1, 2, 3, 4]


def test_a_record_lost_on_the_way_ends_the_run_with_an_error(folder, monkeypatch):
    """The driver proves every page it sent came back, as the local run does (no cluster needed)."""
    ray_data = pytest.importorskip("kosmos_cli.distributed.ray_data")
    from kosmos_cli.distributed.worker import EngineSpec
    from kosmos_cli.pages import iter_pages

    monkeypatch.setattr(ray_data.ray.data, "from_items", lambda rows: rows)
    lost = types.SimpleNamespace(iter_rows=lambda: iter([]))  # a Dataset whose records all went missing
    monkeypatch.setattr(ray_data, "_records", lambda rows, *args, **kwargs: lost)
    items = iter_pages(sorted(p for p in folder.rglob("*.pdf")), render=False)
    runs = ray_data.transcribe_on_ray(EngineSpec("m", "cpu", "float32", False), 1, "ocr", items, dpi=72)
    with pytest.raises(RuntimeError, match=r"internal error: .* more items never came out"):
        list(runs)
