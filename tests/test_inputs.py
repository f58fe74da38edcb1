"""kosmos_cli.inputs: page selection, input expansion, output stems."""

from __future__ import annotations

import io
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from kosmos_cli.documents import DocumentError, open_document
from kosmos_cli.inputs import InputError, assign_stems, collect_inputs, format_ranges, parse_pages, relative_stem
from kosmos_cli.pages import ErrorJob, iter_pages
from kosmos_cli.paths import os_reason
from tests.helpers.images import make_image
from tests.helpers.pdfs import make_pdf
from tests.helpers.cli import kosmos


def paths(*args: str) -> list[str]:
    """The files `collect_inputs` finds for ``args``, as posix strings."""
    return [f.path.as_posix() for f in collect_inputs(args)[0]]


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
    assert format_ranges([(1, 3), (7, 7), (9, None)]) == "1-3,7,9-"
    assert str(parse_pages("1-3,7")) == "1-3,7"


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = Path("scans")
    make_image(root / "p10.png")
    make_image(root / "p2.PNG")
    make_image(root / "sub" / "deep" / "x.JPG")
    make_pdf(root / "a" / "doc.pdf")
    make_pdf(root / "b" / "doc.pdf")
    (root / "notes.txt").write_text("hi")
    make_image(root / ".hidden.png")
    make_image(root / ".cache" / "y.png")
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
    files, errors = collect_inputs(["scans/*.png"])  # case-sensitive glob, like the shell
    assert [f.path.as_posix() for f in files] == ["scans/p10.png"] and errors == []
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
    files, errors = collect_inputs(["-"])
    assert [f.path.as_posix() for f in files] == ["scans/p10.png"] and not errors


def test_stems_never_collide(tree):
    make_image(Path("scans/a/doc.png"))
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
    assert relative_stem("x/y/z.pdf", "x") == "y/z"
    assert relative_stem("x/y/z.pdf", "elsewhere") == "z"
    # case-insensitive twins on a case-sensitive file system
    stems = assign_stems([(Path("d/A.pdf"), Path("d")), (Path("d/a.pdf"), Path("d"))])
    assert len({s.casefold() for s in stems}) == 2


def test_exclude_output_dir(tree):
    make_image(Path("scans/out/page.overlay-0001.png"))
    files, _ = collect_inputs(["scans"], exclude=["scans/out"])
    assert not any("out" in f.path.parts for f in files)


def test_symlinked_duplicates_deduplicated(tree):
    os.symlink(Path("scans/p10.png").resolve(), "link.png")
    assert paths("scans/p10.png", "link.png") == ["scans/p10.png"]


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
    assert paths("scans/.*.png") == ["scans/.hidden.png"]
    assert paths("scans/*/d*/*") == ["scans/sub/deep/x.JPG"]


def test_globs_skip_symlinked_directories_but_follow_symlinked_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image(Path("elsewhere/far.png"))
    make_image(Path("scans/near.png"))
    os.symlink(Path("elsewhere").resolve(), "scans/linked")
    os.symlink(Path("scans/near.png").resolve(), "scans/twin.png")
    assert paths("scans/**/*.png") == ["scans/near.png"]  # twin.png: the same file, deduplicated
    files, errors = collect_inputs(["scans/l*"])
    assert files == [] and errors[0].reason == "no files match"
    # a folder given literally is the user's choice, symlink or not
    assert paths("scans/linked") == ["scans/linked/far.png"]


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


def test_os_reason_words():
    """One wording of OS errors for inputs, documents and the command's own messages."""
    assert os_reason(PermissionError(13, "Permission denied")) == "permission denied"
    assert os_reason(FileNotFoundError(2, "No such file or directory")) == "no such file or directory"
    assert os_reason(OSError(28, "No space left on device")) == "no space left on device"
    assert os_reason(IsADirectoryError(21, "Is a directory")) == "is a directory"
    assert os_reason(OSError("Something odd")) == "something odd"

    class Carries(OSError):  # writers.OutputError: its reason wins over strerror
        reason = "Disk quota exceeded"

    assert os_reason(Carries(122, "EDQUOT")) == "disk quota exceeded"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_cli_named_pipe_is_refused_not_waited_for(tmp_path):
    pipe = tmp_path / "pipe.pdf"
    os.mkfifo(pipe)
    with deadline(20), unblocking(pipe):
        result = kosmos("md", pipe, "--model", "/nonexistent/model")
    assert result.exit_code == 1
    assert f"kosmos: {pipe}: not a regular file (named pipe)\n" in result.stderr
