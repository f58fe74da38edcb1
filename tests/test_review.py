"""`--review-below P`: the pages below P named on stderr (lowest first, 20 at most) and, with -o, all of
them in OUT/<task>.review.tsv, rewritten from the stored pages at every run given the flag.

The image-dependent tiny Kosmos-2.5 checkpoint gives the pages of different colours different
confidences (and two of the images the same one, a tie); the expected lists are computed from the
records of a run with `--format jsonl`, never from numbers written here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from kosmos_cli.review import tsv_field
from tests.helpers.cli import jsonl, kosmos, state_file
from tests.helpers.images import write_image
from tests.helpers.pdfs import make_image_pdf

# One page a batch: a page's confidence can differ in its 6th digit with the pages decoded beside it
# (0.436946 in a batch of four, 0.436947 alone), and the runs here are compared across inputs.
FAST = ["--max-new-tokens", "4", "--dpi", "36", "-b", "1"]
ODD = b"odd\tname\ncaf\xe9 a\\b.png"  # a tab, a newline, a byte that is not UTF-8 and a backslash
ODD_SHOWN = "odd\\tname\\ncaf\\xe9 a\\\\b.png"  # as the TSV and the stderr list write it
HEADER = "source\tpage\tconfidence\ttruncated"


@pytest.fixture(scope="module")
def model(kosmos25_sharded) -> str:
    return str(kosmos25_sharded)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """23 PDF pages (more than the 20 named on stderr), three images (two of the same confidence) and
    one with an odd name."""
    root = tmp_path_factory.mktemp("review") / "in"
    make_image_pdf(root / "many.pdf", 23)
    for name, color in [("white.png", "white"), ("black.png", "black"), ("red.png", "red")]:
        write_image(root / "img" / name, color=color)
    with open(os.path.join(os.fsencode(root), ODD), "wb") as f:
        Image.new("RGB", (64, 48), "blue").save(f, format="PNG")
    return root


@pytest.fixture(scope="module")
def records(folder, model) -> list[dict]:
    result = kosmos("ocr", folder, "--model", model, "-f", "jsonl", *FAST)
    assert result.exit_code == 0, result.stderr
    return jsonl(result.stdout)


def below(records: list[dict], p: float) -> list[dict]:
    """The records a review below p lists, in its order: lowest first, then source, then page."""
    listed = [r for r in records if r["error"] is None and r["confidence"] is not None and r["confidence"] < p]
    return sorted(listed, key=lambda r: (r["confidence"], r["source"], r["page"]))


def stored(out: Path) -> list[dict]:
    """The page records kept under OUT/.kosmos."""
    return [json.loads(path.read_text()) for path in (out / ".kosmos" / "ocr").rglob("*.json")]


def tsv_of(records: list[dict]) -> str:
    return "".join(f"{line}\n" for line in [HEADER] + [
        f"{tsv_field(r['source'])}\t{r['page']}\t{json.dumps(r['confidence'])}\t{json.dumps(r['truncated'])}"
        for r in records])


def named(r: dict) -> str:
    return f"{tsv_field(r['source'])} p{r['page']} ({json.dumps(r['confidence'])})"


def last_line(stderr: str) -> str:
    return stderr.rstrip("\n").split("\n")[-1]


def test_stderr_names_the_lowest_20_in_order_and_counts_the_rest(folder, model, records):
    listed = below(records, 1.0)
    assert len(listed) == len(records) == 27
    confidences = [r["confidence"] for r in listed]
    assert len(set(confidences)) > 2 and len(set(confidences)) < len(confidences)  # distinct values and ties
    result = kosmos("ocr", folder, "--model", model, "-f", "jsonl", "--review-below", "1", *FAST)
    assert result.exit_code == 0, result.stderr
    assert jsonl(result.stdout) == records  # stdout is the results only
    assert last_line(result.stderr) == (f"kosmos: 27 pages below 1: {', '.join(map(named, listed[:20]))}, and 7 more")


def test_only_pages_strictly_below_p(folder, model, records):
    images = [r for r in records if "/img/" in r["source"]]
    p = max(r["confidence"] for r in images)  # red.png's: it is not below it
    listed = below(images, p)
    assert len(listed) == 2 and listed[0]["confidence"] == listed[1]["confidence"] < p  # black and white
    result = kosmos("ocr", folder / "img", "--model", model, "--review-below", str(p), *FAST)
    assert result.exit_code == 0, result.stderr
    assert last_line(result.stderr) == f"kosmos: 2 pages below {p:g}: {', '.join(map(named, listed))}"
    none = kosmos("ocr", folder / "img", "--model", model, "--review-below", "0", *FAST)
    assert none.exit_code == 0 and last_line(none.stderr) == "kosmos: no pages below 0"


def test_the_tsv_has_every_page_below_p_with_names_escaped(folder, model, records, tmp_path):
    out = tmp_path / "out"
    result = kosmos("ocr", folder, "--model", model, "-o", out, "--review-below", "1", *FAST)
    assert result.exit_code == 0, result.stderr
    text = (out / "ocr.review.tsv").read_text(encoding="utf-8")
    assert text == tsv_of(below(records, 1.0))
    rows = [line.split("\t") for line in text.splitlines()]
    assert all(len(row) == 4 for row in rows) and len(rows) == 28
    odd = [row for row in rows if row[0].endswith(ODD_SHOWN)]
    assert odd and odd[0][0] == tsv_field(str(folder)) + "/" + ODD_SHOWN
    assert ODD_SHOWN in result.stderr and f"(all in {out / 'ocr.review.tsv'})" in last_line(result.stderr)
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []  # written atomically


def test_quiet_hides_the_list_and_still_writes_the_tsv(folder, model, records, tmp_path):
    out = tmp_path / "out"
    result = kosmos("ocr", folder / "img", "--model", model, "-o", out, "--review-below", "1", "-q", *FAST)
    assert result.exit_code == 0 and result.stderr == ""
    assert (out / "ocr.review.tsv").read_text() == tsv_of(below([r for r in records if "/img/" in r["source"]], 1.0))


def test_resume_rewrites_the_tsv_from_the_stored_pages(folder, model, records, tmp_path):
    out = tmp_path / "out"
    tsv = out / "ocr.review.tsv"
    run = lambda *args: kosmos("ocr", *args, "--model", model, "-o", out, *FAST)
    assert run(folder, "--review-below", "1").exit_code == 0
    first = tsv.read_text()
    tsv.write_text("stale\n")
    again = run(folder, "--review-below", "1")
    assert again.exit_code == 0 and "0 pages in" in again.stderr and "27 already done" in again.stderr
    assert tsv.read_text() == first
    # Another P, from the stored pages; a run without the flag leaves the file as it is.
    p = sorted(r["confidence"] for r in records)[5]
    assert run(folder, "--review-below", str(p)).exit_code == 0
    assert tsv.read_text() == tsv_of(below(records, p))
    assert run(folder).exit_code == 0 and tsv.read_text() == tsv_of(below(records, p))
    # Only the pages of this run's inputs count, done or not, and nothing of inputs not named.
    images = [r for r in records if "/img/" in r["source"]]
    assert run(folder / "img", "--review-below", "1").exit_code == 0
    assert tsv.read_text() == tsv_of(below(images, 1.0))
    # No page at all (every input failed): the header alone, and the exit code a failed input has.
    failed = run(folder / "missing.png", "--review-below", "1")
    assert failed.exit_code == 1 and tsv.read_text() == HEADER + "\n"


def test_pages_stored_without_a_confidence_are_not_listed(folder, model, records, tmp_path):
    """Pages stored by a version before confidence existed resume as done, and are not ranked."""
    out = tmp_path / "out"
    assert kosmos("ocr", folder / "img", "--model", model, "-o", out, *FAST).exit_code == 0
    old = state_file(out, "ocr", "red", 1)
    record = json.loads(old.read_text())
    del record["confidence"], record["new_tokens"]
    old.write_text(json.dumps(record) + "\n")
    result = kosmos("ocr", folder / "img", "--model", model, "-o", out, "--review-below", "1", *FAST)
    assert result.exit_code == 0 and "3 already done" in result.stderr
    kept = [r for r in records if "/img/" in r["source"] and not r["source"].endswith("red.png")]
    assert (out / "ocr.review.tsv").read_text() == tsv_of(below(kept, 1.0))
    assert last_line(result.stderr) == (f"kosmos: 2 pages below 1: {', '.join(map(named, below(kept, 1.0)))} "
                                        f"(all in {out / 'ocr.review.tsv'}); 1 page without a confidence "
                                        "(stored by an older version; --overwrite redoes them)")


def test_a_failed_input_keeps_exit_code_1(folder, model, records, tmp_path):
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4 broken")
    result = kosmos("ocr", folder / "img", broken, "--model", model, "-o", tmp_path / "out", "--review-below", "1", *FAST)
    assert result.exit_code == 1
    images = [r for r in records if "/img/" in r["source"]]
    assert (tmp_path / "out" / "ocr.review.tsv").read_text() == tsv_of(below(images, 1.0))


def test_a_tsv_that_cannot_be_written_is_an_error(folder, model, tmp_path):
    out = tmp_path / "out"
    (out / "ocr.review.tsv").mkdir(parents=True)  # a folder where the file goes
    result = kosmos("ocr", folder / "img", "--model", model, "-o", out, "--review-below", "1", "-q", *FAST)
    assert result.exit_code == 1
    assert result.stderr == f"kosmos: cannot write {out / 'ocr.review.tsv'}: is a directory\n"
    assert (out / "red.txt").exists()  # the results are written all the same


def test_two_worker_processes_write_the_same_tsv(folder, model, tmp_path):
    """The pages of both workers reach the review, read back the same way on resume. (The values of the
    two runs are not compared digit for digit: a worker has its share of the cores, and a page's
    confidence can differ in its 6th digit with the number of threads that computed it.)"""
    out = {}
    for device in ("cpu", "cpu,cpu"):
        out[device] = tmp_path / device
        result = kosmos("ocr", folder, "--model", model, "-o", out[device], "--device", device, "--review-below", "1",
                        *FAST)
        assert result.exit_code == 0, result.stderr
        assert (out[device] / "ocr.review.tsv").read_text() == tsv_of(below(stored(out[device]), 1.0))
    rows = {device: [line.split("\t") for line in (folder / "ocr.review.tsv").read_text().splitlines()]
            for device, folder in out.items()}
    assert sorted(row[:2] for row in rows["cpu"]) == sorted(row[:2] for row in rows["cpu,cpu"])
    first = (out["cpu,cpu"] / "ocr.review.tsv").read_bytes()
    again = kosmos("ocr", folder, "--model", model, "-o", out["cpu,cpu"], "--device", "cpu,cpu", "--review-below", "1",
                   *FAST)
    assert again.exit_code == 0 and "27 already done" in again.stderr
    assert (out["cpu,cpu"] / "ocr.review.tsv").read_bytes() == first


@pytest.mark.parametrize("command", ["md", "ground"])
def test_md_and_ground_review_too(command, k2, model, tmp_path):
    png = write_image(tmp_path / "page.png")
    result = kosmos(command, png, "--model", k2 if command == "ground" else model, "-f", "jsonl", "--review-below", "1",
                    *FAST)
    assert result.exit_code == 0, result.stderr
    (record,) = jsonl(result.stdout)
    assert last_line(result.stderr) == f"kosmos: 1 page below 1: {named(record)}"


@pytest.mark.parametrize("value", ["-0.1", "1.5", "abc", "nan", "inf", ""])
@pytest.mark.parametrize("command", ["ocr", "md", "ground"])
def test_a_value_outside_0_to_1_is_a_usage_error(command, value, model, tmp_path):
    png = write_image(tmp_path / "page.png")
    result = kosmos(command, png, "--model", model, "--review-below", value, "-o", tmp_path / "out")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == f"kosmos: --review-below must be a number from 0 to 1, not {value!r}\n"
    assert not (tmp_path / "out").exists()  # found before anything is written
