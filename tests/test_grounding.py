"""Kosmos-2 grounding post-processing against transformers' Kosmos2Processor.post_process_generation.

Well-formed text must give exactly the oracle's caption and entities; malformed or truncated text
(where the oracle returns nothing or coordinates outside the image) has its own expected results.
"""

from __future__ import annotations

import random

import pytest

pytest.importorskip("transformers")

from kosmos_cli.tasks.grounding import Entity, boxes_to_pixels, parse_grounding, patch_indices_to_box  # noqa: E402
from tests.helpers.kosmos2 import SNOWMAN, load_kosmos2_oracle  # noqa: E402

P = "<patch_index_{:04d}>".format
DELIM = "</delimiter_of_multi_objects/>"


@pytest.fixture(scope="module")
def k2_oracle(k2_dir):
    model, processor = load_kosmos2_oracle(k2_dir)
    return k2_dir, model, processor


@pytest.fixture(scope="module")
def processor(k2_oracle):
    return k2_oracle[2]


def ours(text):
    caption, entities = parse_grounding(text)
    return caption, [(e.text, e.span, e.boxes) for e in entities]


def oracle(processor, text):
    caption, entities = processor.post_process_generation(text)
    return caption, [(name, tuple(span), [tuple(b) for b in boxes]) for name, span, boxes in entities]


# ------------------------------------------------------------------------------------------ parity
WELL_FORMED = [
    SNOWMAN,
    "<image>. the, to and of</image>" + SNOWMAN,
    # several boxes for one phrase
    "<grounding> Two<phrase> puppies</phrase><object>" + P(79) + P(1016) + DELIM + P(135) + P(1008) + "</object>"
    " sit in<phrase> the grass</phrase><object>" + P(480) + P(1023) + "</object>.",
    # bare objects (no phrase), one and several boxes
    "<grounding> An image of<object>" + P(44) + P(863) + "</object> and more.",
    "look<object>" + P(1) + P(2) + DELIM + P(33) + P(99) + DELIM + P(0) + P(1023) + "</object> here",
    # text (and tags) before </image> are ignored; the last </image> counts
    "<phrase>ignored</phrase><object>" + P(1) + P(2) + "</object></image> kept<phrase> a cat</phrase><object>"
    + P(10) + P(500) + "</object>",
    "a</image>b</image><grounding> only<phrase> this</phrase><object>" + P(64) + P(66) + "</object>",
    # box geometry: same cell, same row, same column, general
    "<phrase>cell</phrase><object>" + P(100) + P(100) + "</object>",
    "<phrase>row</phrase><object>" + P(96) + P(100) + "</object>",
    "<phrase>column</phrase><object>" + P(4) + P(996) + "</object>",
    "<phrase>general</phrase><object>" + P(33) + P(990) + "</object>",
    # corners given in reverse order are kept as emitted
    "<phrase>reversed</phrase><object>" + P(990) + P(33) + "</object>",
    # non-4-digit indices are accepted like the reference does
    "<phrase>short</phrase><object><patch_index_12><patch_index_345></object>",
    # whitespace and unicode around phrases
    "   <grounding>   Un<phrase>  bonhomme de neige  </phrase><object>" + P(44) + P(863) + "</object>   ",
    "<grounding> Снеговик<phrase> у костра</phrase><object>" + P(5) + P(911) + "</object>。雪人",
    "line one\n<phrase>line two</phrase><object>" + P(1) + P(40) + "</object>\nline three",
    # a space between </phrase> and <object>: the reference links nothing and names the box
    "<phrase> a dog</phrase> <object>" + P(1) + P(40) + "</object> runs",
    # consecutive objects after one phrase: the second is bare
    "<phrase>x</phrase><object>" + P(1) + P(40) + "</object><object>" + P(2) + P(41) + "</object>",
    # nested phrase: the innermost one is linked
    "<phrase>outer <phrase>inner</phrase><object>" + P(1) + P(40) + "</object> tail</phrase>",
    # other tags and stray angle brackets are removed from the caption
    "<grounding></doc></chunk></line> a < b > c<phrase> d</phrase><object>" + P(7) + P(77) + "</object>",
    # no tags, nothing, only tags
    "just a caption.",
    "",
    "<grounding><phrase></phrase><object></object>",
    "   ",
]


@pytest.mark.parametrize("text", WELL_FORMED)
def test_parity_with_oracle(processor, text):
    assert ours(text) == oracle(processor, text)


def test_snowman_known_output():
    caption, entities = parse_grounding(SNOWMAN)
    assert caption == "An image of a snowman warming himself by a fire."
    assert entities == [
        Entity("a snowman", (12, 21), [(0.390625, 0.046875, 0.984375, 0.828125)]),
        Entity("a fire", (41, 47), [(0.171875, 0.015625, 0.484375, 0.890625)]),
    ]
    for e in entities:
        assert caption[e.span[0] : e.span[1]] == e.text


def _random_well_formed(rng):
    pair = lambda: P(rng.randrange(1024)) + P(rng.randrange(1024))  # noqa: E731
    parts = [rng.choice(["", "<grounding>", " ", "<image>x</image>", "a</image><grounding> "])]
    for _ in range(rng.randint(0, 5)):
        parts.append(rng.choice([" a", " the dog", " x  y", "  ", ".", "", "\n", " é ж 雪", ",", " ok!"]))
        if rng.random() < 0.7:
            if rng.random() < 0.8:
                parts.append("<phrase>" + rng.choice([" a cat", "b", " two  dogs ", " é", "x>y", "\nz"]) + "</phrase>")
            parts.append("<object>" + DELIM.join(pair() for _ in range(rng.randint(1, 3))) + "</object>")
    parts.append(rng.choice(["", " ", ".", "  \n"]))
    return "".join(parts)


def _span_outside(result):
    caption, entities = result
    return any(s < 0 or e < s or e > len(caption) for _, (s, e), _ in entities)


def test_parity_on_random_well_formed_text(processor):
    rng = random.Random(7)
    texts = [_random_well_formed(rng) for _ in range(3000)]
    # Where the reference's spans fall outside the caption (objects inside leading/trailing
    # whitespace) ours are clamped instead; everything else must be identical.
    diffs = [t for t in texts if ours(t) != oracle(processor, t) and not _span_outside(oracle(processor, t))]
    assert diffs == []


# ------------------------------------------------------------------------------------------ malformed
C = 1 / 32


def test_truncated_object_keeps_complete_pairs(processor):
    text = "An image of<phrase> a dog</phrase><object>" + P(44) + P(863)
    assert ours(text) == ("An image of a dog", [("a dog", (12, 17), [patch_indices_to_box(44, 863)])])
    assert oracle(processor, text)[1] == []  # the reference drops it
    # interrupted by text or another tag instead of </object>
    text = "<phrase>a dog</phrase><object>" + P(44) + P(863) + " runs<phrase> far</phrase>"
    assert ours(text)[1] == [("a dog", (0, 5), [patch_indices_to_box(44, 863)])]
    text = "<phrase>a</phrase><object>" + P(1) + P(2) + DELIM + P(3) + P(4) + DELIM
    assert ours(text)[1] == [("a", (0, 1), [patch_indices_to_box(1, 2), patch_indices_to_box(3, 4)])]


def test_truncated_inside_a_pair_gives_no_entity():
    assert ours("An image of<phrase> a dog</phrase><object>" + P(44)) == ("An image of a dog", [])
    assert ours("An image of<phrase> a dog</phrase><object>") == ("An image of a dog", [])
    assert ours("An image of<phrase> a dog</phrase><obj") == ("An image of a dog<obj", [])


def test_unclosed_phrase():
    assert ours("An image of<phrase> a dog") == ("An image of a dog", [])
    # an unclosed phrase before a well-formed one does not swallow it
    text = "<phrase>a <phrase>b</phrase><object>" + P(1) + P(2) + "</object>"
    assert ours(text) == ("a b", [("b", (2, 3), [patch_indices_to_box(1, 2)])])


def test_odd_number_of_patch_indices(processor):
    text = "<phrase>x</phrase><object>" + P(1) + P(40) + P(99) + "</object>"
    assert ours(text) == ("x", [("x", (0, 1), [patch_indices_to_box(1, 40)])])
    assert oracle(processor, text)[1] == []
    text = "<phrase>x</phrase><object>" + P(1) + P(40) + DELIM + P(99) + "</object>"
    assert ours(text)[1] == [("x", (0, 1), [patch_indices_to_box(1, 40)])]
    assert ours("<phrase>x</phrase><object>" + P(7) + "</object>") == ("x", [])


def test_lone_patch_indices_are_only_removed():
    assert ours("a " + P(44) + " b" + P(1) + P(2)) == ("a  b", [])


def test_patch_index_out_of_grid(processor):
    bad = "<phrase>x</phrase><object>" + P(2000) + P(1) + "</object>"
    assert ours(bad) == ("x", [])
    _, ref_entities = oracle(processor, bad)
    assert max(ref_entities[0][2][0]) > 1.0  # the reference returns coordinates off the image
    mixed = "<phrase>x</phrase><object>" + P(1) + P(40) + DELIM + P(5) + P(1024) + "</object>"
    assert ours(mixed) == ("x", [("x", (0, 1), [patch_indices_to_box(1, 40)])])


def test_doubled_delimiter_and_empty_object():
    text = "<phrase>x</phrase><object>" + P(1) + P(40) + DELIM + DELIM + P(2) + P(41) + "</object>"
    assert ours(text)[1] == [("x", (0, 1), [patch_indices_to_box(1, 40), patch_indices_to_box(2, 41)])]
    assert ours("<phrase>x</phrase><object></object>") == ("x", [])


def test_whitespace_only_phrase_and_objects_in_surrounding_whitespace(processor):
    text = "a<phrase> </phrase><object>" + P(1) + P(40) + "</object> b"
    caption, entities = parse_grounding(text)
    assert caption == "a  b" and entities == [Entity("", (2, 2), [patch_indices_to_box(1, 40)])]
    text = "  <object>" + P(1) + P(40) + "</object> x  <object>" + P(2) + P(41) + "</object>  "
    assert ours(text) == (
        "x",
        [
            ("<patch_index_1><patch_index_40>", (0, 0), [patch_indices_to_box(1, 40)]),
            ("<patch_index_2><patch_index_41>", (1, 1), [patch_indices_to_box(2, 41)]),
        ],
    )
    assert _span_outside(oracle(processor, text))  # the reference gives (-1, -1) and (3, 3)


def test_garbage_never_crashes_and_keeps_invariants():
    rng = random.Random(3)
    atoms = [
        "<phrase>", "</phrase>", "<object>", "</object>", DELIM, "<grounding>", "</image>", "<image>",
        " a", " dog", "  ", ".", "<", ">", "\n", "é", P(44), P(863), P(5), P(1), P(32), P(33), P(1023),
        "<patch_index_2000>", "<patch_index_12>", "<patch_index_>", "<patch_index_-1>", "</", "<phr",
    ]  # fmt: skip
    for _ in range(5000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 30)))
        if rng.random() < 0.3:
            text = text[: rng.randint(0, len(text))]  # truncated anywhere, even inside a tag
        caption, entities = parse_grounding(text)
        assert isinstance(caption, str)
        for e in entities:
            assert 0 <= e.span[0] <= e.span[1] <= len(caption)
            assert e.boxes and all(0.0 <= v <= 1.0 for box in e.boxes for v in box)
            if not e.text.startswith("<patch_index_"):
                assert caption[e.span[0] : e.span[1]] == e.text


# ------------------------------------------------------------------------------------------ boxes
def test_patch_indices_to_box():
    assert patch_indices_to_box(44, 863) == (0.390625, 0.046875, 0.984375, 0.828125)
    assert patch_indices_to_box(0, 0) == (0.0, 0.0, C, C)
    assert patch_indices_to_box(1023, 1023) == (1 - C, 1 - C, 1.0, 1.0)
    assert patch_indices_to_box(0, 31) == (0.0, 0.0, 1.0, C)  # same row: whole cells
    assert patch_indices_to_box(0, 992) == (0.0, 0.0, C, 1.0)  # same column: whole cells
    assert patch_indices_to_box(0, 1023) == (C / 2, C / 2, 1 - C / 2, 1 - C / 2)  # cell centres


def test_boxes_to_pixels():
    boxes = [(0.390625, 0.046875, 0.984375, 0.828125), (0.171875, 0.015625, 0.484375, 0.890625)]
    assert boxes_to_pixels(boxes, 640, 480) == [[250, 22, 630, 397], [110, 7, 310, 427]]
    # reversed corners are put in order; out-of-image values are clipped
    assert boxes_to_pixels([(0.5, 0.75, 0.25, 0.125)], 100, 200) == [[25, 25, 50, 150]]
    assert boxes_to_pixels([(-0.1, 0.0, 1.5, 1.0)], 10, 10) == [[0, 0, 10, 10]]
    assert boxes_to_pixels([], 10, 10) == []


# ------------------------------------------------------------------------------------------ end to end
def test_generated_text_from_fixture(k2_oracle):
    """Real generate() output of the tiny model: decode, then parse like the processor."""
    import torch
    from PIL import Image

    from kosmos_cli.processing.kosmos2 import Kosmos2Tokenizer

    path, model, processor = k2_oracle
    tok = Kosmos2Tokenizer.from_dir(path)
    inputs = processor(text="<grounding> An image of", images=Image.new("RGB", (64, 48), (0, 90, 200)), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False, no_repeat_ngram_size=3)
    text = tok.decode(out[0].tolist())
    assert text == processor.batch_decode(out, skip_special_tokens=True)[0]
    caption, _ = parse_grounding(text)
    assert caption == processor.post_process_generation(text)[0]
