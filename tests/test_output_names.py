"""Output names that always fit the file system (NAME_MAX), and paths as valid UTF-8 in every output."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from kosmos_cli.paths import display_path
from kosmos_cli.results import PageResult
from kosmos_cli.tasks import find_task
from kosmos_cli.writers import atomic
from kosmos_cli.writers.atomic import OutputError, atomic_open, atomic_write_text
from kosmos_cli.writers.directory import OutputDir
from kosmos_cli.writers.formats import page_comment

MODEL = "microsoft/kosmos-2.5"
NAME_MAX = 255

LONG_NAMES = {
    "ascii-255": "a" * 255,
    "utf8-254": "é" * 127,  # 2 bytes each: a cut in the middle of one would leave invalid UTF-8
    "undecodable-253": os.fsdecode(b"\xe9\xff" + "é".encode() * 50 + b"\xe9" * 149),
}


def nbytes(name: str) -> int:
    return len(os.fsencode(name))


def undisplay(text: str) -> bytes:
    """The inverse of `display_path`: ``\\\\`` → a backslash, ``\\xHH`` → that byte, the rest UTF-8."""
    out = bytearray()
    for piece in re.split(r"(\\\\|\\x[0-9a-f]{2})", text):
        if piece == "\\\\":
            out += b"\\"
        elif piece.startswith("\\x") and len(piece) == 4:
            out.append(int(piece[2:], 16))
        else:
            out += piece.encode("utf-8")
    return bytes(out)


def all_components_fit(root: Path) -> None:
    for p in root.rglob("*"):
        assert nbytes(p.name) <= NAME_MAX, p
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def write_document(out: OutputDir, stem: str, pages=(1, 2)) -> list[Path]:
    for page in pages:
        out.write_page(stem, PageResult(Path("in") / "x.pdf", page, out.task.name, MODEL, 10, 10, text=f"page {page}",
                                        lines=[{"text": "t", "polygon": [0, 0, 5, 0, 5, 5, 0, 5]}]))
        out.write_overlay(stem, page, Image.new("RGB", (4, 4), "white"))
    return out.assemble(stem, pages)


@pytest.mark.parametrize("name", list(LONG_NAMES.values()), ids=list(LONG_NAMES))
@pytest.mark.parametrize("task", ["md", "ocr"])
def test_long_names_are_shortened_to_fit_and_found_again(tmp_path, name, task):
    stem = f"sub/{name}"
    out = OutputDir(tmp_path, task, model=MODEL)
    docs = write_document(out, stem)
    assert [p.suffix for p in docs] == ([".md"] if task == "md" else [".txt", ".json"])
    assert all(p.is_file() for p in docs)
    overlays = [out.overlay_file(stem, p) for p in (1, 2)]
    assert all(p.is_file() for p in overlays)
    all_components_fit(tmp_path)

    # one shortened base for every file of the document, cut at a character boundary, in "sub"
    bases = {p.name[: -len(".overlay-0001.png")] for p in overlays} | {p.name[: -len(p.suffix)] for p in docs}
    (base,) = bases
    assert re.fullmatch(r".+~[0-9a-f]{8}", base) and docs[0].parent == tmp_path / "sub"
    assert os.fsencode(name).startswith(os.fsencode(base[:-9]))
    if "\udce9" not in name:
        os.fsencode(base).decode("utf-8")  # no broken multi-byte character
    state = out.page_file(stem, 1)
    assert state.is_file() and state.parent.name == base

    # a second run (resume) finds the pages and writes the same names
    again = OutputDir(tmp_path, task, model=MODEL)
    assert again.is_done(stem, 1) and again.is_done(stem, 2)
    assert again.assemble(stem, [1, 2]) == docs
    assert again.overlay_file(stem, 1) == overlays[0]


def test_shortened_names_stay_unique(tmp_path):
    out = OutputDir(tmp_path, "md", model=MODEL)
    a, b = "x" * 300 + "a", "x" * 300 + "b"
    assert out.document_files(a) != out.document_files(b)
    assert out.page_file(a, 1) != out.page_file(b, 1)
    assert out.overlay_file(a, 1) != out.overlay_file(b, 1)


def test_names_that_fit_are_unchanged(tmp_path):
    out = OutputDir(tmp_path, "ocr")
    stem = "d" * (NAME_MAX - len(".overlay-0001.png"))  # the longest name that needs no shortening
    assert out.overlay_file(stem, 1).name == stem + ".overlay-0001.png"
    assert [p.name for p in out.document_files(stem)] == [stem + ".txt", stem + ".json"]
    assert out.page_file(f"f/{stem}", 3) == tmp_path / ".kosmos" / "ocr" / "f" / stem / "0003.json"
    longer = stem + "d"
    assert all(longer not in p.name for p in [out.overlay_file(longer, 1), *out.document_files(longer)])


def test_overlay_of_a_page_past_9999_fits(tmp_path):
    out = OutputDir(tmp_path, "ocr")
    name = "b" * 240
    path = out.write_overlay(name, 123456, Image.new("RGB", (2, 2)))
    assert path.name.endswith(".overlay-123456.png") and nbytes(path.name) <= NAME_MAX


def test_temp_file_name_does_not_depend_on_the_target(tmp_path):
    target = tmp_path / ("é" * 127)
    with atomic_open(target) as f:
        f.write(b"x")
        (tmp,) = [p.name for p in tmp_path.iterdir()]
        assert tmp.startswith(".") and tmp.endswith(".tmp") and nbytes(tmp) < 40
    assert target.read_bytes() == b"x" and [p.name for p in tmp_path.iterdir()] == [target.name]


# --------------------------------------------------------------------------------------------------
# Write failures name the file
# --------------------------------------------------------------------------------------------------


def test_a_file_in_place_of_a_folder_names_the_target(tmp_path):
    out = OutputDir(tmp_path, "md", model=MODEL)
    (tmp_path / "sub").write_text("in the way")
    out.write_page("sub/doc", PageResult("doc.pdf", 1, "md", MODEL))  # state is under .kosmos: fine
    with pytest.raises(OutputError) as info:
        out.assemble("sub/doc", [1])
    err = info.value
    assert err.path == tmp_path / "sub" / "doc.md"
    assert str(err).startswith(f"cannot write {display_path(err.path)}: ") and err.reason in str(err)
    assert isinstance(err, OSError) and ".tmp" not in str(err)
    (tmp_path / ".kosmos" / "md" / "blocked").write_text("")
    with pytest.raises(OutputError) as info:
        out.write_page("blocked", PageResult("b.pdf", 1, "md", MODEL))
    assert info.value.path == out.page_file("blocked", 1)
    all_components_fit(tmp_path)


@pytest.mark.parametrize("where", ["create", "write", "fsync", "replace"])
def test_a_failed_write_names_the_target_and_leaves_nothing(tmp_path, monkeypatch, where):
    target = tmp_path / os.fsdecode(b"r\xe9sum\xc3\xa9.md")
    target.write_text("old")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if where == "write":
        with pytest.raises(OutputError) as info:
            with atomic_open(target):
                fail()
    else:
        target_of = {"create": (atomic, "_open_temp"), "fsync": (atomic.os, "fsync"), "replace": (atomic.os, "replace")}
        monkeypatch.setattr(*target_of[where], fail)
        with pytest.raises(OutputError) as info:
            atomic_write_text(target, "new")
    monkeypatch.undo()
    assert info.value.path == target and info.value.errno == 28
    assert str(info.value) == "cannot write " + display_path(target) + ": No space left on device"
    str(info.value).encode("utf-8")
    assert [p.name for p in tmp_path.iterdir()] == [target.name] and target.read_text() == "old"


@pytest.mark.parametrize("write", ["atomic_write_text", "check_writable"])
def test_a_ctrl_c_right_after_the_temp_file_is_created_leaves_nothing(tmp_path, monkeypatch, write):
    """The press lands after the file exists and before its descriptor reaches the caller."""
    target = tmp_path / "doc.md"
    target.write_text("old")
    real = atomic._open_temp

    def interrupted(tmp):
        os.close(real(tmp))
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_open_temp", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new") if write == "atomic_write_text" else atomic.check_writable(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["doc.md"] and target.read_text() == "old"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_names_the_target(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError) as info:
            atomic_write_text(folder / "a.md", "x")
        assert info.value.path == folder / "a.md" and "Permission denied" in str(info.value)
    finally:
        folder.chmod(0o700)


# --------------------------------------------------------------------------------------------------
# Non-UTF-8 file names: valid UTF-8 everywhere, reversible
# --------------------------------------------------------------------------------------------------

CAFE = os.fsdecode(b"caf\xe9.png")


def test_page_result_source_is_display_text():
    for r in [PageResult(Path(CAFE), 1, "ocr", MODEL), PageResult.failed(Path(CAFE), 1, "ocr", MODEL, "boom"),
              PageResult(CAFE, 1, "ocr", MODEL)]:  # a str holding surrogate escapes is a raw name too
        assert r.source == "caf\\xe9.png"
        line = r.to_json().encode("utf-8")
        assert json.loads(line)["source"] == "caf\\xe9.png"
        assert undisplay(json.loads(line)["source"]) == b"caf\xe9.png"
        assert PageResult.from_json(line.decode("utf-8")).source == r.source  # applied once only
    odd = Path(os.fsdecode(b"dir\\with\\back\xffslash.pdf"))
    r = PageResult(odd, 1, "md", MODEL)
    assert r.source == "dir\\\\with\\\\back\\xffslash.pdf" and undisplay(r.source) == os.fsencode(odd)
    assert PageResult.from_json(r.to_json()).source == r.source
    assert PageResult("a\\\\b.png", 1, "md", MODEL).source == "a\\\\b.png"  # display text kept as given


def test_every_text_of_a_result_is_valid_utf8(tmp_path):
    r = PageResult(Path(CAFE), 1, "ocr", MODEL, error=f"cannot open {CAFE}")
    r.lines = [{"text": "x\udcff", "polygon": [0] * 8}]
    d = json.loads(r.to_json().encode("utf-8"))
    assert CAFE not in d["error"] and "caf" in d["error"]
    comment = page_comment(2, error=f"bad {CAFE}", source=Path(CAFE))
    comment.encode("utf-8")
    assert comment.startswith("<!-- caf\\xe9.png, page 2: error: bad caf")
    assert find_task(r.task).text(r).encode("utf-8") and r.to_json().encode("utf-8")


@pytest.mark.parametrize("task", ["md", "ocr"])
def test_non_utf8_names_through_the_output_folder(tmp_path, task):
    stem = os.fsdecode(b"sub/caf\xe9")
    out = OutputDir(tmp_path, task, model=MODEL)
    out.write_page(stem, PageResult(Path(CAFE), 1, task, MODEL, text="one"))
    out.write_page(stem, PageResult.failed(Path(CAFE), 2, task, MODEL, f"cannot render {CAFE}"))
    assert out.read_page(stem, 1).source == "caf\\xe9.png" and out.is_done(stem, 1)
    docs = out.assemble(stem, [1, 2])
    assert [p.name for p in docs] == [os.fsdecode(b"caf\xe9") + s for s in ([".md"] if task == "md" else [".txt", ".json"])]
    for p in docs:
        p.read_bytes().decode("utf-8")
    if task == "ocr":
        doc = json.loads(docs[1].read_bytes())
        assert doc["source"] == "caf\\xe9.png" and doc["pages"][1]["error"].startswith("cannot render caf")


def test_surrogates_read_back_from_a_page_file_are_written_as_utf8(tmp_path):
    out = OutputDir(tmp_path, "md", model=MODEL)
    out.page_file("d", 1).parent.mkdir(parents=True)
    # valid JSON and valid UTF-8, but its \udcXX escapes decode to lone surrogates
    record = PageResult("d.pdf", 1, "md", MODEL, text="caf\\udce9 au lait").to_json().replace("\\\\udce9", "\\udce9")
    out.page_file("d", 1).write_text(record, encoding="utf-8")
    (doc,) = out.assemble("d", [1])
    assert doc.read_bytes().decode("utf-8") == "caf\\udce9 au lait\n"


def test_a_model_folder_with_an_undecodable_name_resumes(tmp_path):
    model = os.fsdecode(b"/models/k\xe9")
    out = OutputDir(tmp_path, "md", model=model)
    out.write_page("d", PageResult("d.pdf", 1, "md", model, text="x"))
    out.page_file("d", 1).read_bytes().decode("utf-8")
    assert OutputDir(tmp_path, "md", model=model).is_done("d", 1)
    assert not OutputDir(tmp_path, "md", model="/models/k").is_done("d", 1)
