"""kosmos_cli.documents: inputs, page selection, documents, page jobs, prefetch."""

from __future__ import annotations

import functools
import gc
import io
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import pypdfium2 as pdfium
import pytest
from PIL import Image

from kosmos_cli import documents as D
from kosmos_cli.documents import (
    DEFAULT_DPI,
    DocumentError,
    ErrorJob,
    InputError,
    InputFile,
    PageJob,
    collect_inputs,
    expand_inputs,
    iter_pages,
    open_document,
    parse_pages,
    prefetch,
)
from tests.helpers.images import make_corrupt_g4_tiff, png_header_only, write_image
from tests.helpers.pdfs import FORM_FIELD_RECT, make_form_pdf, make_image_pdf, make_pdf, page_color

IMAGE_EXTS = [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif"]


# The pictures of these tests: 40×30, red.
touch_image = functools.partial(write_image, size=(40, 30), color=(200, 30, 30))


def near(a, b, tol=12):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def kosmos_threads():
    return [t for t in threading.enumerate() if t.name.startswith("kosmos")]


def wait_for_kosmos_threads(seconds=5.0):
    """Background threads finish on their own after an early close; wait for them."""
    deadline = time.monotonic() + seconds
    while kosmos_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return kosmos_threads()


@contextmanager
def deadline(seconds: int):
    """Fail with TimeoutError instead of hanging (SIGALRM interrupts blocking calls like open())."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def unblocking(pipe: Path, seconds: float = 5):
    """After ``seconds``, free whoever waits to open the named pipe for reading (in any thread, where
    SIGALRM cannot reach), so that a test of code that opens it fails instead of hanging."""
    timer = threading.Timer(seconds, lambda: os.close(os.open(pipe, os.O_RDWR)))  # O_RDWR never waits
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# --------------------------------------------------------------------------------------------------
# Page selection
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, n, pages, missing",
    [
        ("1-3,7", 10, [1, 2, 3, 7], []),
        ("5-", 8, [5, 6, 7, 8], []),
        ("-3", 10, [1, 2, 3], []),
        (" 2 , 2-3 ,1 ", 5, [1, 2, 3], []),
        ("4", 4, [4], []),
        ("2-10", 3, [2, 3], [(4, 10)]),
        ("7", 3, [], [(7, 7)]),
        ("5-", 3, [], [(5, None)]),
        ("1-3,7", 5, [1, 2, 3], [(7, 7)]),
        ("1-1000000000", 2, [1, 2], [(3, 1000000000)]),  # no giant lists
    ],
)
def test_parse_and_select(spec, n, pages, missing):
    sel = parse_pages(spec)
    assert sel.select(n) == (pages, missing)


@pytest.mark.parametrize("spec", ["", " ", "0", "3-1", "a", "1-2-3", "-", "1,,2", "1.5", "0-2", "-0", "1;2", "--3"])
def test_parse_pages_rejects(spec):
    with pytest.raises(ValueError, match="page selection"):
        parse_pages(spec)


def test_format_ranges_roundtrip():
    assert D.format_ranges([(1, 3), (7, 7), (9, None)]) == "1-3,7,9-"
    assert str(parse_pages("1-3,7")) == "1-3,7"


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = Path("scans")
    touch_image(root / "p10.png")
    touch_image(root / "p2.PNG")
    touch_image(root / "sub" / "deep" / "x.JPG")
    make_pdf(root / "a" / "doc.pdf")
    make_pdf(root / "b" / "doc.pdf")
    (root / "notes.txt").write_text("hi")
    touch_image(root / ".hidden.png")
    touch_image(root / ".cache" / "y.png")
    return root


def test_directory_recursive_sorted_filtered(tree):
    files, errors = collect_inputs(["scans"])
    assert errors == []
    assert [f.path.as_posix() for f in files] == [
        "scans/a/doc.pdf", "scans/b/doc.pdf", "scans/p2.PNG", "scans/p10.png", "scans/sub/deep/x.JPG",
    ]
    # stems mirror the subfolders below the directory argument
    assert [f.stem for f in files] == ["a/doc", "b/doc", "p2", "p10", "sub/deep/x"]


def test_globs(tree):
    paths, errors = expand_inputs(["scans/*.png"])  # case-sensitive glob, like the shell
    assert [p.as_posix() for p in paths] == ["scans/p10.png"] and errors == []
    files, errors = collect_inputs(["scans/**/*.pdf"])
    assert [f.path.as_posix() for f in files] == ["scans/a/doc.pdf", "scans/b/doc.pdf"]
    assert [f.stem for f in files] == ["a/doc", "b/doc"]  # relative to the glob's fixed part
    files, _ = collect_inputs(["scans/s*"])  # a glob matching a directory walks it
    assert [f.path.as_posix() for f in files] == ["scans/sub/deep/x.JPG"]
    assert [f.stem for f in files] == ["sub/deep/x"]


def test_missing_and_bad_inputs_are_errors_not_exceptions(tree):
    empty = Path("empty_dir")
    empty.mkdir()
    files, errors = collect_inputs(["nope.pdf", "scans/*.docx", "scans/notes.txt", "empty_dir", "scans/p10.png"])
    assert [f.path.as_posix() for f in files] == ["scans/p10.png"]
    reasons = {e.path: e.reason for e in errors}
    assert reasons["nope.pdf"] == "no such file or directory"
    assert reasons["scans/*.docx"] == "no files match"
    assert "unsupported file type '.txt'" in reasons["scans/notes.txt"]
    assert "no supported files" in reasons["empty_dir"]
    assert str(errors[0]) == "nope.pdf: no such file or directory"
    _, errors = collect_inputs(["scans/*.txt"])
    assert errors[0].reason == "no supported files match"


def test_stdin_dedup_and_order(tree):
    stdin = io.StringIO("scans/p2.PNG\n\n   \nscans/sub\r\n./scans/p2.PNG\nmissing.png\n")
    files, errors = collect_inputs(["scans/p10.png", "-", "scans/p10.png", "-"], stdin=stdin)
    assert [f.path.as_posix() for f in files] == ["scans/p10.png", "scans/p2.PNG", "scans/sub/deep/x.JPG"]
    assert [(e.path, e.reason) for e in errors] == [("missing.png", "no such file or directory")]


def test_default_stdin_is_sys_stdin(tree, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("scans/p10.png\n"))
    paths, errors = expand_inputs(["-"])
    assert [p.as_posix() for p in paths] == ["scans/p10.png"] and not errors


def test_stems_never_collide(tree):
    touch_image(Path("scans/a/doc.png"))
    files, _ = collect_inputs(["scans/a/doc.pdf", "scans/b/doc.pdf", "scans/a/doc.png", "scans/p10.png"])
    stems = [f.stem for f in files]
    assert stems == ["a/doc.pdf", "b/doc.pdf", "a/doc.png", "p10"]
    # the same two files as arguments: disambiguated by their folders
    files, _ = collect_inputs(["scans/a/doc.pdf", "scans/b/doc.pdf"])
    assert [f.stem for f in files] == ["a/doc", "b/doc"]
    # same name, different extensions, same folder
    files, _ = collect_inputs(["scans/a/doc.pdf", "scans/a/doc.png"])
    assert [f.stem for f in files] == ["doc.pdf", "doc.png"]
    # stable: same arguments, same stems
    assert [f.stem for f in collect_inputs(["scans"])[0]] == [f.stem for f in collect_inputs(["scans"])[0]]


def test_assign_stems_last_resort_and_relative_stem():
    assert D.relative_stem("x/y/z.pdf", "x") == "y/z"
    assert D.relative_stem("x/y/z.pdf", "elsewhere") == "z"
    # case-insensitive twins on a case-sensitive file system
    stems = D.assign_stems([(Path("d/A.pdf"), Path("d")), (Path("d/a.pdf"), Path("d"))])
    assert len({s.casefold() for s in stems}) == 2


def test_exclude_output_dir(tree):
    touch_image(Path("scans/out/page.overlay-0001.png"))
    files, _ = collect_inputs(["scans"], exclude=["scans/out"])
    assert not any("out" in f.path.parts for f in files)


def test_symlinked_duplicates_deduplicated(tree):
    os.symlink(Path("scans/p10.png").resolve(), "link.png")
    paths, _ = expand_inputs(["scans/p10.png", "link.png"])
    assert [p.as_posix() for p in paths] == ["scans/p10.png"]


def test_globs_do_not_follow_symlink_loops(tree):
    os.symlink(".", "scans/self")
    os.symlink("..", "scans/sub/up")
    with deadline(20):
        files, errors = collect_inputs(["scans/**/*.png", "scans/**/*.JPG", "scans/**"])
    assert errors == []
    assert [f.path.as_posix() for f in files] == [
        "scans/p10.png", "scans/sub/deep/x.JPG", "scans/a/doc.pdf", "scans/b/doc.pdf", "scans/p2.PNG",
    ]
    assert [f.stem for f in files] == ["p10", "sub/deep/x", "a/doc", "b/doc", "p2"]
    # the same semantics as before otherwise: hidden names skipped unless the pattern asks for them
    assert [p.as_posix() for p in expand_inputs(["scans/.*.png"])[0]] == ["scans/.hidden.png"]
    assert [p.as_posix() for p in expand_inputs(["scans/*/d*/*"])[0]] == ["scans/sub/deep/x.JPG"]


def test_globs_skip_symlinked_directories_but_follow_symlinked_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    touch_image(Path("elsewhere/far.png"))
    touch_image(Path("scans/near.png"))
    os.symlink(Path("elsewhere").resolve(), "scans/linked")
    os.symlink(Path("scans/near.png").resolve(), "scans/twin.png")
    paths, _ = expand_inputs(["scans/**/*.png"])
    assert [p.as_posix() for p in paths] == ["scans/near.png"]  # twin.png: the same file, deduplicated
    paths, errors = expand_inputs(["scans/l*"])
    assert paths == [] and errors[0].reason == "no files match"
    # a folder given literally is the user's choice, symlink or not
    assert [p.as_posix() for p in expand_inputs(["scans/linked"])[0]] == ["scans/linked/far.png"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_fifo_in_a_folder_or_glob_is_skipped_with_a_note(tree):
    os.mkfifo("scans/pipe.pdf")
    os.mkfifo("scans/pipe.txt")  # unsupported names are ignored as always
    with deadline(10), unblocking(Path("scans/pipe.pdf")):
        files, errors = collect_inputs(["scans", "scans/**/*.pdf"])
        assert "scans/pipe.pdf" not in [f.path.as_posix() for f in files]
        assert [(e.path, e.reason, e.warning) for e in errors] == [
            ("scans/pipe.pdf", "not a regular file (named pipe), skipped", True),
            ("scans/pipe.pdf", "not a regular file (named pipe), skipped", True),
        ]
        assert not InputError("x", "y").warning  # failures stay failures by default
        files, errors = collect_inputs(["scans/pipe.pdf"])  # named explicitly: a failure
        assert files == [] and [(e.reason, e.warning) for e in errors] == [("not a regular file (named pipe)", False)]
        with pytest.raises(DocumentError, match=r"not a regular file \(named pipe\)"):
            open_document("scans/pipe.pdf")
        (item,) = iter_pages([Path("scans/pipe.pdf")])
        assert isinstance(item, ErrorJob) and "not a regular file" in item.error


# --------------------------------------------------------------------------------------------------
# Documents: PDFs
# --------------------------------------------------------------------------------------------------


def test_pdf_pages_render_lazily_at_dpi(tmp_path):
    path = make_image_pdf(tmp_path / "three.pdf", 3, size=(144, 72))
    with open_document(path, dpi=100) as doc:
        assert doc.num_pages == 3 and doc.kind == "pdf" and doc.source == path
        for k in range(3):
            im = doc.page(k).image
            assert im.mode == "RGB"
            assert im.size == (math.ceil(144 * 100 / 72), math.ceil(72 * 100 / 72))
            # square at 18..54 pt from the bottom left: centre (36, 36) pt → (50, 50) px from the top left
            assert near(im.getpixel((50, im.height - 50)), page_color(k))
            assert im.getpixel((im.width - 3, 3)) == (255, 255, 255)
        with pytest.raises(IndexError):
            doc.page(3)
    assert doc.closed
    doc.close()  # idempotent


def test_default_dpi_letter_size(tmp_path):
    path = make_pdf(tmp_path / "letter.pdf", 1, size=(612, 792))
    assert DEFAULT_DPI in (150, 200)
    im = open_document(path).page(0).image
    assert im.size == (math.ceil(612 * DEFAULT_DPI / 72), math.ceil(792 * DEFAULT_DPI / 72))


def test_encrypted_pdf(tmp_path):
    path = make_pdf(tmp_path / "secret.pdf", 2, user_password="s3cret")
    with pytest.raises(DocumentError, match="encrypted; pass --password"):
        open_document(path)
    with pytest.raises(DocumentError, match="encrypted and the password is wrong"):
        open_document(path, password="nope")
    with open_document(path, dpi=72, password="s3cret") as doc:
        im = doc.page(1).image
        assert doc.num_pages == 2 and im.size == (200, 100)
        assert im.getpixel((50, 50)) == (0, 0, 0)  # the decrypted content stream was drawn
    # owner password opens it too
    assert open_document(path, dpi=72, password="owner").num_pages == 2


def test_owner_only_encryption_ignores_batch_password(tmp_path):
    path = make_pdf(tmp_path / "restricted.pdf", 1, user_password="")
    assert open_document(path, dpi=72).page(0).image.getpixel((50, 50)) == (0, 0, 0)
    assert open_document(path, dpi=72, password="for-another-file").num_pages == 1
    plain = make_pdf(tmp_path / "plain.pdf", 1)
    assert open_document(plain, dpi=72, password="whatever").num_pages == 1


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"%PDF-1.4\nnot really\n", "corrupt"),
        (b"hello, this is text", "corrupt"),
    ],
)
def test_bad_pdfs(tmp_path, content, reason):
    path = tmp_path / "bad.pdf"
    path.write_bytes(content)
    with pytest.raises(DocumentError, match=reason) as info:
        open_document(path)
    assert info.value.path == str(path) and str(info.value).startswith(str(path))


def test_truncated_pdf(tmp_path):
    full = make_pdf(tmp_path / "full.pdf", 3).read_bytes()
    for cut in (len(full) // 3, len(full) - 40):
        path = tmp_path / f"cut{cut}.pdf"
        path.write_bytes(full[:cut])
        with pytest.raises(DocumentError, match="truncated"):
            open_document(path)


def test_pdf_without_pages(tmp_path):
    path = tmp_path / "none.pdf"
    pdf = pdfium.PdfDocument.new()
    pdf.save(str(path))
    pdf.close()
    with pytest.raises(DocumentError, match="page-less|no pages"):
        open_document(path)


def test_gigantic_pdf_page_is_refused_before_rendering(tmp_path):
    path = make_pdf(tmp_path / "huge.pdf", 1, size=(14400, 14400))  # 200×200 in, the PDF maximum
    doc = open_document(path)  # opening is fine
    with pytest.raises(DocumentError, match=r"40000×40000 = 1,600,000,000 pixels.*lower --dpi"):
        doc.page(0)
    assert open_document(path, dpi=2).page(0).image.size == (400, 400)
    with pytest.raises(DocumentError, match="exceeds the limit"):
        open_document(make_pdf(tmp_path / "small.pdf", 1), dpi=72, max_pixels=1000).page(0)


def test_stale_pdfium_error_code_is_not_reported_as_encryption(tmp_path):
    with pytest.raises(DocumentError, match="encrypted"):
        open_document(make_pdf(tmp_path / "enc.pdf", 1, user_password="x"))
    path = tmp_path / "none.pdf"
    pdf = pdfium.PdfDocument.new()
    pdf.save(str(path))
    pdf.close()
    with pytest.raises(DocumentError) as info:
        open_document(path)
    assert "encrypted" not in str(info.value)


PAPER_POINTS = {  # as PDFs store them (ISO sizes rounded to 0.001 pt)
    "letter": ("612", "792"),
    "legal": ("612", "1008"),
    "tabloid": ("792", "1224"),
    "A3": ("841.89", "1190.551"),
    "A4": ("595.276", "841.89"),
    "A5": ("419.528", "595.276"),
}
COMMON_DPI = [72, 96, 150, 200, 300, 600, 1200]


@pytest.mark.parametrize("paper", PAPER_POINTS)
def test_page_pixels_of_common_paper_sizes(tmp_path, paper):
    """Pixels = the page's exact extent at the dpi, rounded up: 792 pt at 300 dpi is 3300 px, not 3301."""
    w_pt, h_pt = PAPER_POINTS[paper]
    path = make_pdf(tmp_path / f"{paper}.pdf", [b""], size=(w_pt, h_pt))
    for dpi in COMMON_DPI:
        exact = tuple(math.ceil(Fraction(v) * dpi / 72) for v in (w_pt, h_pt))
        assert D.page_pixels(float(w_pt), float(h_pt), dpi) == exact, (paper, dpi)
        with open_document(path, dpi=dpi) as doc:
            page = doc.page(0)
        assert page.size == exact, (paper, dpi)
        if exact[0] * exact[1] <= D.WORK_PIXELS:  # rendered at full size: the bitmap is that size
            assert page.image.size == exact, (paper, dpi)
    assert D.page_pixels(612, 792, 300) == (2550, 3300)


def test_filled_form_fields_are_drawn(tmp_path):
    path = make_form_pdf(tmp_path / "form.pdf")
    with open_document(path, dpi=72) as doc:
        im = doc.page(0).image.convert("L")
    x0, y0, x1, y1 = FORM_FIELD_RECT
    field = im.crop((x0, im.height - y1, x1, im.height - y0))
    assert field.getextrema()[0] < 64  # the value's glyphs are dark
    outside = im.crop((0, 0, im.width, im.height - y1))
    assert outside.getextrema() == (255, 255)


def test_pdf_error_messages_do_not_depend_on_the_file_before(tmp_path):
    """pdfium's last-error code is process-global: each file's message must come from that file alone."""
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\nnot really\n")
    pageless = tmp_path / "none.pdf"
    pdf = pdfium.PdfDocument.new()
    pdf.save(str(pageless))
    pdf.close()
    encrypted = make_pdf(tmp_path / "enc.pdf", 1, user_password="x")
    good = make_pdf(tmp_path / "good.pdf", 1)

    def message(path):
        try:
            open_document(path).close()
        except DocumentError as exc:
            return exc.reason
        return None

    for target in (broken, pageless):
        after = {before.name: (message(before), message(target))[1] for before in (encrypted, good, broken, pageless)}
        assert len(set(after.values())) == 1, after
    assert "encrypted" not in message(pageless) and "no pages" in message(pageless)
    assert "corrupt" in message(broken)


def test_saslprep():
    sasl = D._saslprep
    assert sasl("I\u00adX") == "IX"  # soft hyphen: mapped to nothing (RFC 4013 examples)
    assert sasl("user") == "user" and sasl("USER") == "USER"
    assert sasl("\u00aa") == "a" and sasl("\u2168") == "IX"  # NFKC
    assert sasl("pass\u00a0word") == "pass word"  # non-ASCII space → space
    assert sasl("\ufb01le") == "file" and sasl("\uff46\uff49\uff4c\uff45") == "file"
    assert sasl("\u0007") is None  # prohibited: control character
    assert sasl("\u0627\u0031") is None  # bidi: RandAL first but not last
    assert sasl("\u0627\u0031\u0628") == "\u0627\u0031\u0628"


@pytest.mark.parametrize("typed", ["\ufb01le", "\uff46\uff49\uff4c\uff45", "fi\u00adle"])
def test_aes256_password_is_saslprepped(tmp_path, typed):
    """PDF 2.0: an R6 password is SASLprep'd, so what a user types opens what a conforming writer stored."""
    pikepdf = pytest.importorskip("pikepdf")
    path = tmp_path / "r6.pdf"
    with pikepdf.new() as pdf:
        pdf.add_blank_page(page_size=(200, 100))
        pdf.save(path, encryption=pikepdf.Encryption(user="file", owner="owner-pw", R=6))
    with open_document(path, password=typed) as doc:
        assert doc.num_pages == 1
    with pytest.raises(DocumentError, match="password is wrong"):
        open_document(path, password="fi1e")
    # a writer that stored the password unprocessed still gets what the user typed, first
    raw = tmp_path / "raw.pdf"
    with pikepdf.new() as pdf:
        pdf.add_blank_page(page_size=(200, 100))
        pdf.save(raw, encryption=pikepdf.Encryption(user=typed, owner="owner-pw", R=6))
    assert open_document(raw, password=typed).num_pages == 1


def test_pdf_sniffed_by_content(tmp_path):
    path = tmp_path / "actually_a_pdf.png"
    path.write_bytes(make_pdf(tmp_path / "x.pdf", 2).read_bytes())
    assert open_document(path).kind == "pdf"


def test_concurrent_pdf_renders_are_serialised_and_correct(tmp_path):
    paths = [make_image_pdf(tmp_path / f"d{i}.pdf", 4) for i in range(2)]
    docs = [open_document(p, dpi=72) for p in paths]
    expected = {(i, k): docs[i].page(k).image.tobytes() for i in range(2) for k in range(4)}
    errors = []

    def work(seed):
        rng = random.Random(seed)
        for _ in range(25):
            i, k = rng.randrange(2), rng.randrange(4)
            if docs[i].page(k).image.tobytes() != expected[(i, k)]:
                errors.append((i, k))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for d in docs:
        d.close()


@pytest.fixture
def unraisable(monkeypatch):
    """Exceptions Python would print as "Exception ignored in ..." (from finalizers)."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: seen.append(info.exc_type))
    return seen


def test_dropping_a_document_never_blocks_on_the_pdfium_lock(tmp_path, unraisable):
    doc = open_document(make_pdf(tmp_path / "a.pdf", 1))
    handle = doc._pdf
    locked, release = threading.Event(), threading.Event()

    def render_elsewhere():  # stands for a long render in a worker thread
        with D.PDFIUM_LOCK:
            locked.set()
            release.wait(2)

    worker = threading.Thread(target=render_elsewhere)
    worker.start()
    locked.wait()
    try:
        started = time.monotonic()
        del doc  # the last reference: the finalizer runs here, while the worker holds the lock for 2 s
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
        worker.join()
    gc.collect()
    assert handle.raw is not None  # not closed behind the lock's back...
    open_document(make_pdf(tmp_path / "b.pdf", 1)).close()
    assert handle.raw is None  # ...but by the next pdfium call
    assert unraisable == []


def test_ctrl_c_in_a_document_finalizer_is_not_printed(tmp_path, unraisable):
    """A second Ctrl-C during cleanup must not print "Exception ignored in Document.__del__"."""

    class Interrupted:
        def close(self):
            raise KeyboardInterrupt

    doc = D.Document(tmp_path / "x.pdf", "pdf", 1, 72, D.MAX_PIXELS, pdf=Interrupted())
    del doc
    gc.collect()
    assert unraisable == []


# --------------------------------------------------------------------------------------------------
# Documents: images
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", IMAGE_EXTS)
def test_every_image_type(tmp_path, ext):
    path = tmp_path / f"img{ext}"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(path)
    with open_document(path, dpi=300) as doc:  # dpi does not resize images
        assert doc.kind == "image" and doc.num_pages == 1
        im = doc.page(0).image
    assert im.mode == "RGB" and im.size == (64, 48)
    assert near(im.getpixel((10, 10)), (200, 40, 40), tol=30)


def test_uppercase_extension(tmp_path):
    path = tmp_path / "SCAN.JPEG"
    Image.new("RGB", (8, 8), "white").save(path, format="JPEG")
    assert open_document(path).page(0).image.size == (8, 8)


def test_multi_frame_tiff_every_frame_is_a_page(tmp_path):
    path = tmp_path / "multi.tif"
    frames = [Image.new("RGB", (30 + 10 * k, 20), page_color(k)) for k in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    doc = open_document(path)
    assert doc.num_pages == 3
    for k in range(3):
        im = doc.page(k).image
        assert im.size == (30 + 10 * k, 20) and im.getpixel((5, 5)) == page_color(k)


def test_gif_first_frame_only(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    doc = open_document(path)
    assert doc.num_pages == 1
    assert near(doc.page(0).image.getpixel((5, 5)), (255, 0, 0))


@pytest.mark.parametrize("ext", [".jpg", ".tif"])
def test_exif_orientation_applied(tmp_path, ext):
    path = tmp_path / f"rotated{ext}"
    im = Image.new("RGB", (60, 20), (255, 255, 255))
    im.paste((0, 0, 0), (0, 0, 10, 20))  # black stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    im.save(path, exif=exif)
    out = open_document(path).page(0).image
    assert out.size == (20, 60)
    assert near(out.getpixel((10, 3)), (0, 0, 0), tol=40)  # the left stripe is now at the top
    assert near(out.getpixel((10, 50)), (255, 255, 255), tol=40)


@pytest.mark.parametrize("mode, ext", [("RGBA", ".png"), ("LA", ".png"), ("RGBA", ".webp"), ("RGBA", ".tif")])
def test_alpha_composited_on_white(tmp_path, mode, ext):
    im = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # fully transparent black
    im.paste((0, 0, 0, 255), (0, 0, 5, 10))  # left half opaque black
    im = im.convert(mode)
    path = tmp_path / f"alpha{ext}"
    im.save(path, **({"lossless": True} if ext == ".webp" else {}))
    out = open_document(path).page(0).image
    assert out.mode == "RGB"
    assert out.getpixel((8, 5)) == (255, 255, 255)
    assert out.getpixel((2, 5)) == (0, 0, 0)


def test_palette_transparency_and_other_modes(tmp_path):
    p = Image.new("P", (10, 10), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.paste(1, (0, 0, 5, 10))
    path = tmp_path / "p.png"
    p.save(path, transparency=0)
    out = open_document(path).page(0).image
    assert out.getpixel((8, 5)) == (255, 255, 255) and out.getpixel((2, 5)) == (255, 0, 0)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (10, 10), (0, 0, 0, 0)).save(cmyk)
    assert near(open_document(cmyk).page(0).image.getpixel((5, 5)), (255, 255, 255))
    one = tmp_path / "one.bmp"
    Image.new("1", (10, 10), 0).save(one)
    assert open_document(one).page(0).image.getpixel((5, 5)) == (0, 0, 0)


def test_16_bit_scaled_not_clipped(tmp_path):
    im = Image.new("I;16", (4, 4), 32768)
    path = tmp_path / "deep.png"
    im.save(path)
    v = open_document(path).page(0).image.getpixel((1, 1))
    assert 120 <= v[0] <= 135 and v[0] == v[1] == v[2]


def test_pdf_working_image_is_rendered_small_and_size_is_the_full_page(tmp_path):
    """At --dpi 1200 a letter page is 10200×13200 px: pdfium renders ≤ WORK_PIXELS, `size` is the full page."""
    quarter = b"0 0 0 rg 0 0 306 396 re f"  # the lower-left quarter, black
    path = make_pdf(tmp_path / "letter.pdf", [quarter], size=(612, 792))
    with open_document(path, dpi=1200) as doc:
        page = doc.page(0)
    assert page.size == (10200, 13200)
    w, h = page.image.size
    assert page.image.mode == "RGB" and w * h <= D.WORK_PIXELS and w * h > 0.99 * D.WORK_PIXELS
    assert abs(w / h - 10200 / 13200) < 1 / h
    assert page.image.getpixel((w // 4, h * 3 // 4)) == (0, 0, 0)
    assert page.image.getpixel((w * 3 // 4, h // 4)) == (255, 255, 255)
    assert page.image.getpixel((w // 2 - 3, h // 2 + 3)) == (0, 0, 0)  # the quarter ends at the middle
    assert page.image.getpixel((w // 2 + 3, h // 2 - 3)) == (255, 255, 255)


def test_default_letter_page_keeps_its_full_size(tmp_path):
    path = make_pdf(tmp_path / "letter.pdf", 1, size=(612, 792))
    page = open_document(path).page(0)
    assert page.image.size == page.size == (1700, 2200)


def black_square_image(path, size, mode="1", box=(0.25, 0.5, 0.5, 0.75), **save):
    """A white ``size`` image in ``mode`` with a black square at the fractional ``box`` (x0, y0, x1, y1)."""
    im = Image.new("L", size, 255)
    w, h = size
    im.paste(0, (int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)))
    im.convert(mode).save(path, **save)
    return path


@pytest.mark.parametrize(
    "name, mode, save",
    [
        ("fax.png", "1", {}),
        ("scan.tif", "1", {"compression": "group4"}),
        ("photo.jpg", "RGB", {"quality": 90}),
        ("gray.png", "L", {}),
        ("palette.gif", "P", {}),
        ("alpha.webp", "RGBA", {"lossless": True}),
        ("cmyk.jpg", "CMYK", {}),
    ],
)
def test_big_images_are_read_as_a_bounded_working_image(tmp_path, name, mode, save):
    size = (4100, 3100)  # 12.7 MP: a working image of about a third of that per side
    path = black_square_image(tmp_path / name, size, mode, **save)
    page = open_document(path).page(0)
    assert page.size == size
    w, h = page.image.size
    assert page.image.mode == "RGB" and w * h <= D.WORK_PIXELS and abs(w / h - size[0] / size[1]) < 1 / h
    assert near(page.image.getpixel((int(0.375 * w), int(0.625 * h))), (0, 0, 0), tol=40)
    assert near(page.image.getpixel((int(0.75 * w), int(0.25 * h))), (255, 255, 255), tol=40)


def test_big_16_bit_image_is_scaled_not_clipped(tmp_path):
    im = Image.new("I;16", (3000, 2000), 32768)
    im.paste(65535, (0, 0, 1500, 2000))
    path = tmp_path / "deep.png"
    im.save(path)
    page = open_document(path).page(0)
    w, h = page.image.size
    assert page.size == (3000, 2000) and w * h <= D.WORK_PIXELS
    assert page.image.getpixel((w // 4, h // 2)) == (255, 255, 255)
    assert 120 <= page.image.getpixel((w * 3 // 4, h // 2))[0] <= 135


def test_big_image_exif_orientation_applies_to_size_and_image(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    black_square_image(path, (4000, 1200), "RGB", box=(0, 0, 0.1, 1), exif=exif)  # black stripe on the left
    page = open_document(path).page(0)
    assert page.size == (1200, 4000)
    w, h = page.image.size
    assert w < h and w * h <= D.WORK_PIXELS
    assert near(page.image.getpixel((w // 2, 3)), (0, 0, 0), tol=40)  # the left stripe is now at the top
    assert near(page.image.getpixel((w // 2, h // 2)), (255, 255, 255), tol=40)


def test_jpeg_is_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    path = black_square_image(tmp_path / "big.jpg", (8000, 6000), "RGB")
    decoded = []
    real_load = Image.Image.load

    def spy(im):
        out = real_load(im)
        decoded.append(im.size)
        return out

    monkeypatch.setattr(Image.Image, "load", spy)
    page = open_document(path).page(0)
    assert page.size == (8000, 6000)
    assert max(w * h for w, h in decoded) <= 4 * D.WORK_PIXELS  # libjpeg scaled the DCT: never 48 MP


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.png", b"", "empty file"),
        ("junk.jpg", b"this is not an image at all", "not a supported image"),
        ("junk.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 30, "corrupt|not a supported image"),
    ],
)
def test_bad_images(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DocumentError, match=reason):
        open_document(path)


def test_truncated_image_fails_at_render_with_document_error(tmp_path):
    path = tmp_path / "cut.png"
    buf = io.BytesIO()
    Image.effect_noise((200, 200), 60).convert("RGB").save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    doc = open_document(path)  # the header is intact
    with pytest.raises(DocumentError, match="truncated"):
        doc.page(0)


def test_decompression_bomb(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    bomb = png_header_only(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(DocumentError, match=r"900,000,000 pixels") as info:
        open_document(bomb)
    assert "decompression bomb" in str(info.value)
    # Beyond Pillow's own refusal (2 × 89 MP) but within ours: admitted (only the header is read)
    big = png_header_only(tmp_path / "big_scan.png", 20000, 12000)  # 240 MP
    assert open_document(big).num_pages == 1
    # a per-call cap
    small = touch_image(tmp_path / "small.png", size=(100, 100))
    with pytest.raises(DocumentError, match="10,000 pixels, over the limit of 1,000"):
        open_document(small, max_pixels=1000)
    # the same check guards every TIFF frame at render time
    tif = tmp_path / "frames.tif"
    Image.new("RGB", (10, 10)).save(tif, save_all=True, append_images=[Image.new("RGB", (100, 100))])
    doc = open_document(tif, max_pixels=5000)
    doc.page(0)
    with pytest.raises(DocumentError, match="page 2: image is 100×100"):
        doc.page(1)


def test_unsupported_directory_missing_unreadable(tmp_path, monkeypatch):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(DocumentError, match="unsupported file type '.txt'"):
        open_document(txt)
    with pytest.raises(DocumentError, match="is a directory"):
        open_document(tmp_path)
    with pytest.raises(DocumentError, match="no such file"):
        open_document(tmp_path / "missing.pdf")
    with pytest.raises(ValueError):
        open_document(txt, dpi=0)

    def deny(*a, **k):
        raise PermissionError(13, "Permission denied", str(a[0]))

    monkeypatch.setattr(D, "open", deny, raising=False)
    with pytest.raises(DocumentError, match="permission denied"):
        open_document(make_pdf(tmp_path / "locked.pdf", 1))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_unreadable_file_real_permissions(tmp_path):
    path = make_pdf(tmp_path / "locked.pdf", 1)
    path.chmod(0)
    try:
        with pytest.raises(DocumentError, match="permission denied"):
            open_document(path)
    finally:
        path.chmod(0o644)


# --------------------------------------------------------------------------------------------------
# Page jobs
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def mixed(tmp_path):
    a = make_image_pdf(tmp_path / "a.pdf", 3)
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"%PDF-1.4 garbage")
    img = touch_image(tmp_path / "img.png")
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
    real_open = D.open_document

    def spy(path, *args, **kw):
        opened.append(Path(path).name)
        return real_open(path, *args, **kw)

    D.open_document = spy
    try:
        it = iter_pages(mixed, parse_pages("2-3"), dpi=72)
        first = next(it)
        assert opened == ["a.pdf"]  # one document at a time
        items = [first] + list(it)
    finally:
        D.open_document = real_open
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
    assert job.size == (5100, 6600) and job.image.width * job.image.height <= D.WORK_PIXELS
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


def test_libtiff_warnings_become_page_notes(tmp_path, capfd):
    path = make_corrupt_g4_tiff(tmp_path / "fax.tif")
    (job,) = iter_pages([path])
    assert job.load() is job and job.image is not None
    assert len(job.notes) == 1
    assert job.notes[0].startswith("libtiff: Fax4Decode: Bad code word at line ")
    assert "more libtiff warnings" in job.notes[0]
    assert "Fax4Decode" not in capfd.readouterr().err  # nothing raw on stderr
    bad = make_corrupt_g4_tiff(tmp_path / "cut.tif", unreadable=True)
    (job,) = iter_pages([bad])
    err = job.load()
    assert isinstance(err, ErrorJob) and "libtiff: TIFFFillStrip: Read error on strip 0" in err.error
    assert "TIFFFillStrip" not in capfd.readouterr().err


def test_stderr_of_other_writers_passes_through_a_tiff_decode(tmp_path, capfd):
    """Only libtiff's lines are taken while fd 2 is captured; anything else still reaches stderr."""
    path = make_corrupt_g4_tiff(tmp_path / "fax.tif")
    real_load = Image.Image.load

    def chatty(im):
        os.write(2, b"kosmos: note: from the main thread\n\x1b[2Kprogress\r")
        return real_load(im)

    Image.Image.load = chatty
    try:
        page = open_document(path).page(0)
    finally:
        Image.Image.load = real_load
    assert all("kosmos" not in n and "progress" not in n for n in page.notes)
    err = capfd.readouterr().err
    assert "kosmos: note: from the main thread\n" in err and "\x1b[2Kprogress\r" in err


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


def kosmos(*args):
    from typer.testing import CliRunner

    from kosmos_cli.cli import app

    result = CliRunner().invoke(app, ["md", *map(str, args), "--model", "/nonexistent/model"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_cli_selection_matching_no_page_fails(tmp_path):
    path = make_pdf(tmp_path / "two.pdf", 2)
    result = kosmos(path, "--pages", "999")
    assert result.exit_code == 1
    assert f"kosmos: {path}: no page of the selection 999 exists (2 pages)\n" in result.stderr
    assert "note:" not in result.stderr


def test_cli_page_errors_name_the_page_once(tmp_path):
    path = make_pdf(tmp_path / "huge.pdf", 2, size=(14400, 14400))
    result = kosmos(path)
    assert result.exit_code == 1
    assert f"kosmos: {path}: page 2: 40000×40000 = 1,600,000,000 pixels at 200 dpi" in result.stderr
    assert "page 2: page 2" not in result.stderr and "page 1: page 1" not in result.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_cli_named_pipe_is_refused_not_waited_for(tmp_path):
    pipe = tmp_path / "pipe.pdf"
    os.mkfifo(pipe)
    with deadline(20), unblocking(pipe):
        result = kosmos(pipe)
    assert result.exit_code == 1
    assert f"kosmos: {pipe}: not a regular file (named pipe)\n" in result.stderr
