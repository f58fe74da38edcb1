"""kosmos_cli.tasks: OCR parsing, markdown cleanup, repetition detection."""

from __future__ import annotations

import random
import time

import pytest

from kosmos_cli.tasks.markdown import PROMPT as MD_PROMPT
from kosmos_cli.tasks.markdown import clean_markdown
from kosmos_cli.tasks.ocr import PROMPT as OCR_PROMPT
from kosmos_cli.tasks.ocr import Line, format_line, ocr_text, parse_ocr
from kosmos_cli.tasks.repetition import Loop, find_loop

RECEIPT = (
    "<bbox><x_53><y_573><x_69><y_606></bbox>1\n"
    "<bbox><x_79><y_573><x_464><y_611></bbox>[REG] BLACK SAKURA\n"
    "<bbox><x_690><y_569><x_810><y_606></bbox>45,455\n"
)


def box(x0, y0, x1, y1, text="t"):
    return f"<bbox><x_{x0}><y_{y0}><x_{x1}><y_{y1}></bbox>{text}\n"


# --------------------------------------------------------------------------------------------------
# OCR
# --------------------------------------------------------------------------------------------------


def test_prompts():
    assert OCR_PROMPT == "<ocr>" and MD_PROMPT == "<md>"


def test_parse_identity_scale():
    lines = parse_ocr(RECEIPT, (1024, 1024), (1024, 1024))
    assert lines == [
        Line("1", [53, 573, 69, 573, 69, 606, 53, 606]),
        Line("[REG] BLACK SAKURA", [79, 573, 464, 573, 464, 611, 79, 611]),
        Line("45,455", [690, 569, 810, 569, 810, 606, 690, 606]),
    ]
    assert lines[1].box == (79, 573, 464, 611)
    assert lines[0].to_dict() == {"text": "1", "polygon": [53, 573, 69, 573, 69, 606, 53, 606]}


def test_parse_scales_to_page_pixels_like_the_reference():
    # model grid 896×1152 (56×72 patches), page rendered at 1700×2200
    (line,) = parse_ocr(box(100, 200, 300, 250, "Total 50,000"), (896, 1152), (1700, 2200))
    sx, sy = 1700 / 896, 2200 / 1152
    assert line.polygon == [int(100 * sx), int(200 * sy), int(300 * sx), int(200 * sy),
                            int(300 * sx), int(250 * sy), int(100 * sx), int(250 * sy)]
    assert line.text == "Total 50,000"


def test_parse_clips_to_page_and_drops_degenerate_boxes():
    raw = (
        box(10, 10, 5000, 90, "wide")          # clipped to the page width
        + box(50, 50, 50, 60, "zero width")    # x0 >= x1
        + box(50, 70, 60, 20, "upside down")   # y0 >= y1
        + box(2000, 10, 3000, 20, "outside")   # entirely right of the page after clipping
        + box(1, 1, 2, 2, "   ")               # empty text
        + box(0, 0, 10, 10, " padded ")
    )
    lines = parse_ocr(raw, (100, 100), (100, 100))
    assert [ln.text for ln in lines] == ["wide", "padded"]
    assert lines[0].polygon == [10, 10, 100, 10, 100, 90, 10, 90]


@pytest.mark.parametrize(
    "tail, expected",
    [
        ("<bbox><x_1><y_2><x_3>", []),                     # half a box at the end
        ("<bbox><x_1><y_2><x_30><y_40>", []),              # complete coordinates, no text yet
        ("<bbox><x_1><y_2><x_30><y_40></bbox>Hel", ["Hel"]),  # cut in the middle of the text
        ("<bbox><x_1><y_2><x_30><y_40>no close", ["no close"]),  # missing </bbox>
        ("<bbox><x_1><y_2></bbox>malformed", []),          # two coordinates only
        ("<bbox", []),
        ("<bbox><x_1><y_2><x_30><y_40></bbox>end</s>", ["end"]),
    ],
)
def test_parse_truncated_output(tail, expected):
    lines = parse_ocr(RECEIPT + tail, (1000, 1000), (1000, 1000))
    assert [ln.text for ln in lines] == ["1", "[REG] BLACK SAKURA", "45,455"] + expected


def test_parse_text_without_box_is_dropped_and_tags_removed():
    raw = "<ocr>stray text before any box\n" + box(0, 0, 10, 10, "a<pad>b") + "<s>"
    lines = parse_ocr(raw, (10, 10), (10, 10))
    assert [ln.text for ln in lines] == ["ab"]
    assert parse_ocr("", (10, 10), (10, 10)) == []
    assert parse_ocr("no boxes at all", (10, 10), (10, 10)) == []
    with pytest.raises(ValueError):
        parse_ocr(RECEIPT, (0, 10), (10, 10))


def test_parse_multiline_text_joined_and_spaces_in_box():
    raw = "<bbox> <x_0> <y_0> <x_10> <y_10> </bbox>first\nsecond\n"
    (line,) = parse_ocr(raw, (10, 10), (10, 10))
    assert line.text == "first second"


def test_plain_format():
    lines = parse_ocr(RECEIPT, (1000, 1000), (1000, 1000))
    assert [format_line(line) for line in lines] == [
        "53,573,69,573,69,606,53,606,1",
        "79,573,464,573,464,611,79,611,[REG] BLACK SAKURA",
        "690,569,810,569,810,606,690,606,45,455",
    ]
    assert ocr_text(lines) == "1\n[REG] BLACK SAKURA\n45,455"


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("<md># Title\n\nText", "# Title\n\nText"),
        ("  <md>  # Title", "# Title"),
        ("line one<br>line two<BR/>three<br />four", "line one\nline two\nthree\nfour"),
        ("  a  \n   b\t\n", "a\nb"),
        ("a\n\n\n\n\nb\n \n \n \nc", "a\n\nb\n\nc"),
        ("- **1 \\[REG\\] BLACK SAKURA** 45,455\n- **1 COOKIE DOH SAUCES** 0</s>",
         "- **1 \\[REG\\] BLACK SAKURA** 45,455\n- **1 COOKIE DOH SAUCES** 0"),
        ("", ""),
        ("text with <md> inside stays", "text with <md> inside stays"),
    ],
)
def test_clean_markdown(raw, clean):
    assert clean_markdown(raw) == clean


# --------------------------------------------------------------------------------------------------
# Repetition
# --------------------------------------------------------------------------------------------------

BBOX, EBBOX, NL = 100286, 100287, 198


def x(i):
    return 100289 + 2 * i


def y(i):
    return 100290 + 2 * i


def ocr_line(x0, y0, x1, y1, text_ids):
    return [BBOX, x(x0), y(y0), x(x1), y(y1), EBBOX, *text_ids, NL]


def random_ids(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n)]


@pytest.mark.parametrize("period", [1, 2, 7, 40, 150, 200])
def test_loops_are_detected(period):
    unit = random_ids(period, seed=period)
    reps = max(4, -(-256 // period)) + 1
    ids = random_ids(300) + unit * reps
    loop = find_loop(ids)
    assert loop is not None and loop.period == period
    assert loop.start == 300 and loop.length == len(ids) - 300
    assert loop.keep == 300 + period and loop.repeats == pytest.approx(reps)
    assert find_loop(ids) is not None


def test_detects_ocr_line_repeated_with_same_box():
    line = ocr_line(53, 573, 69, 606, [16, 17])
    ids = random_ids(50) + line * 40  # the same line and box, 40 times
    loop = find_loop(ids)
    assert loop is not None and loop.period == len(line)


def test_loop_must_be_at_the_tail():
    ids = random_ids(50) + [5, 6, 7] * 200 + random_ids(20, seed=3)
    assert find_loop(ids) is None


def test_no_false_positive_on_column_of_zeros():
    # 300 OCR lines with the same text "0" and the same x, increasing y: legit, must not trigger
    ids = []
    for k in range(300):
        ids += ocr_line(700, 10 + 12 * k, 720, 20 + 12 * k, [15])
    assert find_loop(ids) is None
    # even lines with identical y but different x (a row of zeros across a table)
    ids = []
    for k in range(300):
        ids += ocr_line(10 + 3 * k, 500, 12 + 3 * k, 510, [15])
    assert find_loop(ids) is None


def test_no_false_positive_on_legit_markdown_repetition():
    row = [91, 220, 91, 220, 91, 220, 91, NL]  # "| | | |\n": an empty table row, 8 tokens
    assert find_loop(random_ids(100) + row * 25) is None  # 25 empty rows = 200 tokens
    dots = [1131] * 120  # a long dot leader
    assert find_loop(random_ids(100) + dots) is None
    paragraph = random_ids(150, seed=9)
    assert find_loop(random_ids(10) + paragraph * 3) is None  # a long block three times
    assert find_loop(random_ids(5000)) is None
    assert find_loop([]) is None
    assert find_loop([1] * 100) is None  # too short to judge


def test_parameters():
    ids = random_ids(20) + [1, 2, 3] * 10  # 30 tokens of period 3
    assert find_loop(ids) is None
    assert find_loop(ids, min_tokens=24, min_repeats=4) is not None
    assert find_loop(ids, min_tokens=24, max_period=2) is None
    with pytest.raises(ValueError):
        find_loop(ids, min_repeats=1)
    assert find_loop(ids, min_tokens=24) == Loop(period=3, start=20, length=30)


def test_cheap_on_long_sequences():
    ids = random_ids(20_000)
    short = random_ids(900)
    find_loop(ids)
    t0 = time.perf_counter()
    for _ in range(50):
        find_loop(ids)
    t_long = (time.perf_counter() - t0) / 50
    t0 = time.perf_counter()
    for _ in range(50):
        find_loop(short)
    t_short = (time.perf_counter() - t0) / 50
    assert t_long < 5e-3  # O(tail): the sequence length does not matter
    assert t_long < 3 * t_short + 1e-3


def test_every_task_needs_an_architecture_the_engine_knows():
    from kosmos_cli.engine import ARCHITECTURES
    from kosmos_cli.tasks import TASKS

    assert {name: task.model_kind for name, task in TASKS.items()} == {
        "ocr": "kosmos-2.5", "md": "kosmos-2.5", "ground": "kosmos-2"}
    assert {task.model_kind for task in TASKS.values()} <= set(ARCHITECTURES)
