"""kosmos_cli.pages: page jobs over documents, and the look-ahead that renders them."""

from __future__ import annotations

import gc
import io
import random
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from kosmos_cli import documents
from kosmos_cli.documents import WORK_PIXELS, XFA_NOT_DRAWN, DocumentError, open_document
from kosmos_cli.inputs import InputFile, parse_pages
from kosmos_cli.pages import ErrorJob, InputOrder, PageJob, iter_pages, prefetch
from tests.helpers.images import make_image
from tests.helpers.pdfs import make_image_pdf, make_pdf, make_xfa_pdf
from tests.helpers.cli import kosmos


def kosmos_threads():
    return [t for t in threading.enumerate() if t.name.startswith("kosmos")]


def wait_for_kosmos_threads(seconds=5.0):
    """Background threads finish on their own after an early close; wait for them."""
    deadline = time.monotonic() + seconds
    while kosmos_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return kosmos_threads()


# --------------------------------------------------------------------------------------------------
# Page jobs
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def mixed(tmp_path):
    a = make_image_pdf(tmp_path / "a.pdf", 3)
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"%PDF-1.4 garbage")
    img = make_image(tmp_path / "img.png")
    enc = make_pdf(tmp_path / "enc.pdf", 2, user_password="pw")
    return [a, bad, img, enc]


def describe(items):
    out = []
    for it in items:
        if isinstance(it, PageJob):
            out.append((it.source.name, it.page, "skip" if it.skipped else ("img" if it.image is not None else "job")))
        else:
            out.append((it.source.name, it.page, "warn" if it.warning else "err"))
    return out


def test_iter_pages_order_errors_and_laziness(mixed):
    a, bad, img, enc = mixed
    opened = []
    real_open = documents.open_document

    def spy(path, *args, **kw):
        opened.append(Path(path).name)
        return real_open(path, *args, **kw)

    documents.open_document = spy
    try:
        it = iter_pages(mixed, parse_pages("2-3"), dpi=72)
        first = next(it)
        assert opened == ["a.pdf"]  # one document at a time
        items = [first] + list(it)
    finally:
        documents.open_document = real_open
    assert describe(items) == [
        ("a.pdf", 2, "job"), ("a.pdf", 3, "job"),
        ("bad.pdf", None, "err"),
        ("img.png", None, "err"),  # pages 2-3 of a one-page image: nothing to do is a failure
        ("enc.pdf", None, "err"),
    ]
    assert "encrypted; pass --password" in items[4].error
    assert items[3].error == "no page of the selection 2-3 exists (1 page)"
    job = items[0]
    assert job.stem == "a" and job.num_pages == 3 and job.selected == (2, 3) and not job.is_last
    assert items[1].is_last
    assert job.load() is job and job.image.size == (144, 72)


def test_iter_pages_all_pages_and_documents_closed(mixed):
    a, _, img, enc = mixed
    items = list(iter_pages([a, img, enc], password="pw", dpi=72))
    jobs = [i for i in items if isinstance(i, PageJob)]
    assert [(j.source.name, j.page) for j in jobs] == [("a.pdf", 1), ("a.pdf", 2), ("a.pdf", 3), ("img.png", 1), ("enc.pdf", 1), ("enc.pdf", 2)]
    docs = {id(j.document): j.document for j in jobs}
    assert not any(d.closed for d in docs.values())
    for j in jobs:
        assert j.load() is j
    assert all(d.closed for d in docs.values())  # the last load closes each document


def test_iter_pages_skip_never_renders(tmp_path):
    path = make_image_pdf(tmp_path / "a.pdf", 3)
    calls = []
    items = list(iter_pages([InputFile(path, "x/a")], skip=lambda j: calls.append(j.page) or j.page != 2))
    assert calls == [1, 2, 3]
    assert [(i.page, i.skipped, i.stem) for i in items] == [(1, True, "x/a"), (2, False, "x/a"), (3, True, "x/a")]
    assert items[0].load() is items[0] and items[0].image is None
    items[1].load()
    assert items[1].document.closed
    # everything skipped: the document is closed at once
    items = list(iter_pages([path], skip=lambda j: True))
    assert all(i.skipped for i in items) and items[0].document.closed


def test_iter_pages_early_close_closes_documents(tmp_path):
    path = make_image_pdf(tmp_path / "a.pdf", 5)
    it = iter_pages([path])
    job = next(it)
    it.close()
    assert job.document.closed
    assert isinstance(job.load(), ErrorJob)  # rendering a closed document is a page error, not a crash


def test_page_render_failure_becomes_error_job(tmp_path):
    path = tmp_path / "cut.png"
    buf = io.BytesIO()
    Image.effect_noise((100, 100), 60).convert("RGB").save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[:200])
    (job,) = list(iter_pages([path]))
    err = job.load()
    assert isinstance(err, ErrorJob) and err.page == 1 and "truncated" in err.error and not err.warning


def test_page_job_carries_the_full_size_and_the_working_image(tmp_path):
    path = make_pdf(tmp_path / "big.pdf", 2, size=(612, 792))
    jobs = list(iter_pages([path], dpi=600))
    assert all(j.size is None and j.image is None for j in jobs)
    job = jobs[0].load()
    assert job.size == (5100, 6600) and job.image.width * job.image.height <= WORK_PIXELS
    # a job built around an image already in memory: the image is the page
    im = Image.new("RGB", (30, 20))
    assert PageJob(Path("x.png"), "x", 1, 1, (1,), image=im).size == (30, 20)


def test_selection_matching_no_page_is_a_failure(tmp_path):
    path = make_pdf(tmp_path / "two.pdf", 2)
    (item,) = iter_pages([path], parse_pages("999"))
    assert isinstance(item, ErrorJob) and not item.warning and item.page is None
    assert item.error == "no page of the selection 999 exists (2 pages)"
    items = list(iter_pages([path], parse_pages("2-5,9")))  # partly past the end: a note, as before
    assert describe(items) == [("two.pdf", None, "warn"), ("two.pdf", 2, "job")]
    assert items[0].error == "pages 3-5,9 not in document (2 pages)"


def test_page_errors_name_the_page_once(tmp_path):
    tif = tmp_path / "frames.tif"
    Image.new("RGB", (10, 10)).save(tif, save_all=True, append_images=[Image.new("RGB", (100, 100))])
    _, err = [j.load() for j in iter_pages([tif], max_pixels=5000)]
    assert isinstance(err, ErrorJob) and err.page == 2
    assert err.error.startswith("image is 100×100") and "page" not in err.error
    assert str(err) == f"{tif} (page 2): {err.error}"
    with pytest.raises(DocumentError) as info:  # a DocumentError names its page in str() only
        open_document(tif, max_pixels=5000).page(1)
    assert info.value.page == 2 and str(info.value) == f"{tif}: page 2: {info.value.reason}"
    huge = make_pdf(tmp_path / "huge.pdf", 2, size=(14400, 14400))
    _, err = [j.load() for j in iter_pages([huge])]
    assert err.page == 2 and err.error.startswith("40000×40000 = 1,600,000,000 pixels at 200 dpi")


# --------------------------------------------------------------------------------------------------
# Prefetch
# --------------------------------------------------------------------------------------------------


class FakeJob(PageJob):
    """A page whose `load` sleeps and counts live rendered pages."""

    live = 0
    peak = 0
    lock = threading.Lock()

    def load(self):
        time.sleep(random.random() * 0.004)
        with FakeJob.lock:
            FakeJob.live += 1
            FakeJob.peak = max(FakeJob.peak, FakeJob.live)
        self.image = True
        if self.page % 7 == 0:
            return ErrorJob(self.source, self.stem, self.page, "boom")
        return self

    def consumed(self):
        with FakeJob.lock:
            FakeJob.live -= 1


def fake_jobs(n, pulled=None, closed=None):
    try:
        for k in range(1, n + 1):
            if pulled is not None:
                pulled.append(k)
            yield FakeJob(Path("f"), "f", k, n, tuple(range(1, n + 1)))
    finally:
        if closed is not None:
            closed.append(True)


def test_prefetch_preserves_order_and_passes_errors():
    random.seed(1)
    out = list(prefetch(fake_jobs(60), depth=5, workers=3))
    assert [i.page for i in out] == list(range(1, 61))
    assert [i.page for i in out if isinstance(i, ErrorJob)] == [7, 14, 21, 28, 35, 42, 49, 56]
    assert not kosmos_threads()


def test_prefetch_memory_is_bounded():
    FakeJob.live = FakeJob.peak = 0
    depth = 3
    for item in prefetch(fake_jobs(200), depth=depth, workers=2):
        time.sleep(0.0005)  # a slow consumer
        if isinstance(item, FakeJob):
            item.consumed()
        else:
            with FakeJob.lock:
                FakeJob.live -= 1
    assert FakeJob.peak <= depth + 1


def test_prefetch_early_stop_ends_threads_and_closes_source():
    before = set(threading.enumerate())
    pulled, closed = [], []
    gen = prefetch(fake_jobs(10_000, pulled, closed), depth=4, workers=2)
    for i, _ in enumerate(gen):
        if i == 2:
            break
    gen.close()
    assert not wait_for_kosmos_threads()  # close returns at once; the threads end right after
    assert closed == [True]
    assert len(pulled) <= 3 + 4 + 1
    assert set(threading.enumerate()) <= before


def test_prefetch_abandoned_generator_is_cleaned_up():
    closed = []
    gen = prefetch(fake_jobs(1000, closed=closed), depth=2)
    next(gen)
    del gen
    gc.collect()
    deadline = time.time() + 5
    while kosmos_threads() and time.time() < deadline:
        time.sleep(0.01)
    assert closed == [True] and not kosmos_threads()


def test_prefetch_source_exception_reaches_consumer_after_items():
    def source():
        yield from fake_jobs(3)
        raise RuntimeError("listing failed")

    got = []
    with pytest.raises(RuntimeError, match="listing failed"):
        for item in prefetch(source(), depth=2):
            got.append(item.page)
    assert got == [1, 2, 3] and not kosmos_threads()


def test_prefetch_synchronous_and_validation():
    assert [i.page for i in prefetch(fake_jobs(5), depth=0)] == [1, 2, 3, 4, 5]
    assert not kosmos_threads()
    with pytest.raises(ValueError):
        prefetch([], depth=-1)
    with pytest.raises(ValueError):
        prefetch([], depth=2, workers=0)
    assert list(prefetch([], depth=2)) == []


def test_prefetch_real_documents_match_serial(tmp_path, mixed):
    serial = [i.load() if isinstance(i, PageJob) else i for i in iter_pages(mixed, dpi=72, password="pw")]
    fetched = list(prefetch(iter_pages(mixed, dpi=72, password="pw"), depth=3, workers=2))
    assert describe(fetched) == describe(serial)
    for s, f in zip(serial, fetched):
        if isinstance(s, PageJob):
            assert s.image.tobytes() == f.image.tobytes()
    assert all(f.document.closed for f in fetched if isinstance(f, PageJob))
    assert not kosmos_threads()


def test_prefetch_early_stop_on_real_pdf_closes_document(tmp_path):
    path = make_image_pdf(tmp_path / "long.pdf", 30)
    gen = prefetch(iter_pages([path], dpi=36), depth=2)
    job = next(gen)
    gen.close()
    assert not wait_for_kosmos_threads() and job.document.closed


def test_prefetch_look_ahead_is_bounded_by_bytes():
    """Big pages: at most ``max_bytes`` of rendered pages are held ahead (one is always allowed)."""
    live, peak, lock = [0], [0], threading.Lock()

    class BigJob(PageJob):
        def load(self):
            self.image = Image.new("RGB", (512, 512))  # 1 MiB as Pillow holds RGB
            with lock:
                live[0] += 1
                peak[0] = max(peak[0], live[0])
            return self

    jobs = (BigJob(Path("b"), "b", k, 60, tuple(range(1, 61))) for k in range(1, 61))
    for item in prefetch(jobs, depth=50, workers=2, max_bytes=3 << 20):
        time.sleep(0.002)
        with lock:
            live[0] -= 1
    assert peak[0] <= 3 + 2 + 1  # the budget, the renders in flight, the consumer's page
    big = (BigJob(Path("b"), "b", k, 3, (1, 2, 3)) for k in range(1, 4))
    assert [i.page for i in prefetch(big, depth=4, max_bytes=1)] == [1, 2, 3]  # never stuck


def test_prefetch_close_does_not_wait_for_a_render_in_flight():
    started, done = threading.Event(), threading.Event()

    class SlowJob(PageJob):
        def load(self):
            if self.page == 2:
                started.set()
                time.sleep(2)  # a huge page
                done.set()
            self.image = True
            return self

    closed = []

    def jobs():
        try:
            for k in range(1, 10):
                yield SlowJob(Path("s"), "s", k, 9, tuple(range(1, 10)))
        finally:
            closed.append(True)

    gen = prefetch(jobs(), depth=4, workers=2)
    assert next(gen).page == 1
    assert started.wait(5)
    began = time.monotonic()
    gen.close()
    assert time.monotonic() - began < 0.5 and not done.is_set()
    assert all(t.daemon for t in kosmos_threads())  # interpreter exit does not wait for them
    assert not wait_for_kosmos_threads() and closed == [True]


# --------------------------------------------------------------------------------------------------
# Through the CLI (no page reaches the model, so none is loaded)
# --------------------------------------------------------------------------------------------------


def test_cli_selection_matching_no_page_fails(tmp_path):
    path = make_pdf(tmp_path / "two.pdf", 2)
    result = kosmos("md", path, "--pages", "999", "--model", "/nonexistent/model")
    assert result.exit_code == 1
    assert f"kosmos: {path}: no page of the selection 999 exists (2 pages)\n" in result.stderr
    assert "note:" not in result.stderr


def test_cli_page_errors_name_the_page_once(tmp_path):
    path = make_pdf(tmp_path / "huge.pdf", 2, size=(14400, 14400))
    result = kosmos("md", path, "--model", "/nonexistent/model")
    assert result.exit_code == 1
    assert f"kosmos: {path}: page 2: 40000×40000 = 1,600,000,000 pixels at 200 dpi" in result.stderr
    assert "page 2: page 2" not in result.stderr and "page 1: page 1" not in result.stderr


def test_iter_pages_without_render_lists_only(tmp_path):
    path = make_image_pdf(tmp_path / "a.pdf", 2)
    items = list(iter_pages([path], render=False))
    assert [(i.page, i.selected, i.document) for i in items] == [(1, (1, 2), None), (2, (1, 2), None)]
    assert items[0].load() is items[0] and items[0].image is None


@pytest.mark.parametrize("render", [True, False])
def test_a_document_note_comes_once_before_its_pages(tmp_path, render):
    """An XFA form's note is one warning item per document (not one per page or per open), and none for
    a document whose pages are all done."""
    xfa, plain = make_xfa_pdf(tmp_path / "x.pdf", pages=2), make_image_pdf(tmp_path / "p.pdf", 1)
    items = list(iter_pages([xfa, plain, xfa], render=render, skip=lambda job: job.page == 1 and len(job.selected) == 2))
    notes = [(i.source, i.page, i.error) for i in items if isinstance(i, ErrorJob)]
    assert notes == [(xfa, None, XFA_NOT_DRAWN)] * 2 and all(i.warning for i in items if isinstance(i, ErrorJob))
    assert [type(i).__name__ for i in items[:3]] == ["ErrorJob", "PageJob", "PageJob"]
    for item in items:
        if isinstance(item, PageJob):
            item.load()
    done = list(iter_pages([xfa], skip=lambda job: True, render=render))
    assert [type(i).__name__ for i in done] == ["PageJob", "PageJob"]


@pytest.mark.parametrize("ordered", [True, False])
def test_input_order_holds_items_back_only_when_ordered(ordered):
    order = InputOrder(ordered)
    for key, item in (("long", "page 1"), ("short", "page 2"), (None, "unreadable page 3")):
        order.add(item, key)
    order.finish("short", "page 2", "result 2")
    early = list(order.ready())
    order.finish("long", "page 1", "result 1")
    late = list(order.ready())
    if ordered:
        assert (early, late) == ([], [("page 1", "result 1"), ("page 2", "result 2"), ("unreadable page 3", None)])
    else:
        assert (early, late) == ([("page 2", "result 2"), ("unreadable page 3", None)], [("page 1", "result 1")])
    assert len(order) == 0
