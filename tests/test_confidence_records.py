"""Confidence in the records: which tokens count for a page, a line, a word and a grounded entity
(unit-tested on id and log-probability sequences through the real tokenizers), a checkpoint that
writes a known transcript end to end, the same records whatever the batch, and old state."""

import json
import math

import pytest

from kosmos_cli.confidence import TokenScores, align, rounded
from kosmos_cli.processing.kosmos2 import Kosmos2Tokenizer
from kosmos_cli.processing.kosmos2_5 import Kosmos25Tokenizer
from kosmos_cli.tasks import grounding, ocr
from tests.helpers.cli import FAST, jsonl, kosmos, state_file
from tests.helpers.images import noise_image
from tests.helpers.kosmos2_5 import load_kosmos2_5_oracle
from tests.helpers.scripted import LINES, STRENGTHS, TRANSCRIPT, WORDS, transcript_ids

MODEL_SIZE = PAGE_SIZE = (1000, 1000)  # OCR boxes as generated


def geometric_mean(logprobs) -> float:
    return rounded(math.exp(sum(logprobs) / len(logprobs)))


def save(image, path):
    image.save(path)
    return path


def scores_for(tokenizer, ids, logprobs, text, shift=0):
    starts = align(tokenizer.pieces(ids), text)
    assert starts is not None
    return TokenScores([shift + s for s in starts], logprobs)


@pytest.fixture(scope="module")
def k25_tokenizer(kosmos25_tied):
    return Kosmos25Tokenizer.from_dir(kosmos25_tied)


@pytest.fixture(scope="module")
def k2_tokenizer(k2_dir):
    return Kosmos2Tokenizer.from_dir(k2_dir)


# --------------------------------------------------------------------------------------------------
# Which tokens count where
# --------------------------------------------------------------------------------------------------


def test_lines_and_words_take_the_tokens_that_start_in_them(k25_tokenizer):
    """Text before the first box and a line the parser drops count for the page only; a line's tokens
    run from its <bbox> to the next line's (its newline included); a word takes the tokens from the
    end of the word before (BPE's " word" carries the space); the EOS counts for the page only.
    Non-ASCII text whose characters span several byte-level tokens lands in the right word."""
    segments = [  # (text, where its tokens count)
        ("stray ", "page"),
        ("<bbox><x_10><y_10><x_300><y_40></bbox>Total 50,000\n", "line 1"),
        ("<bbox><x_5><y_9><x_2><y_40></bbox>dropped: x0 > x1\n", "page"),
        ("<bbox><x_10><y_50><x_300><y_90></bbox>Ωμέγα 日本語 ok", "line 2"),
    ]
    ids, owner = [], []
    for text, where in segments:
        seg = k25_tokenizer.encode(text)
        ids += seg
        owner += [where] * len(seg)
    logprobs = [-0.05 * (k % 7) - 0.01 for k in range(len(ids) + 1)]  # + the EOS's
    raw = k25_tokenizer.decode(ids)
    assert raw == "".join(text for text, _ in segments)
    fields = ocr.page_fields(raw, MODEL_SIZE, PAGE_SIZE, scores_for(k25_tokenizer, ids, logprobs, raw))

    lines = fields["lines"]
    assert [line["text"] for line in lines] == ["Total 50,000", "Ωμέγα 日本語 ok"]
    for line, name in zip(lines, ["line 1", "line 2"]):
        assert line["confidence"] == geometric_mean([lp for lp, o in zip(logprobs, owner) if o == name])
    assert TokenScores(None, logprobs).page == geometric_mean(logprobs)

    # Words: the tokens of each word's text (with the space before it), found from the pieces.
    pieces = k25_tokenizer.pieces(ids)
    line_start = raw.index("</bbox>Ωμέγα") + len("</bbox>")
    for word, confidence in zip(["Ωμέγα", " 日本語", " ok"], lines[1]["word_confidences"]):
        start = raw.index(word, line_start)
        offsets = align(pieces, raw)
        mine = [lp for lp, s in zip(logprobs, offsets) if start <= s < start + len(word)]
        assert mine and confidence == geometric_mean(mine)
    assert len(set(lines[1]["word_confidences"])) == 3


def test_a_token_across_a_line_end_belongs_to_the_line_it_starts_in():
    raw = "<bbox><x_1><y_1><x_9><y_9></bbox>ab\n<bbox><x_1><y_20><x_9><y_29></bbox>cd"
    second = raw.index("<bbox>", 1)
    # A made-up tokenization: one token holds "b\n", another starts right at the second <bbox>.
    starts = [0, raw.index("ab"), raw.index("b\n"), second, raw.index("cd")]
    logprobs = [-0.1, -0.2, -0.3, -0.4, -0.5]
    lines = ocr.page_fields(raw, MODEL_SIZE, PAGE_SIZE, TokenScores(starts, logprobs))["lines"]
    assert [line["confidence"] for line in lines] == [geometric_mean([-0.1, -0.2, -0.3]), geometric_mean([-0.4, -0.5])]


def test_unknown_offsets_leave_lines_unknown_and_words_take_their_line():
    raw = "<bbox><x_1><y_1><x_9><y_9></bbox>two words"
    line = ocr.page_fields(raw, MODEL_SIZE, PAGE_SIZE, TokenScores(None, [-0.1]))["lines"][0]
    assert line["confidence"] is None and line["word_confidences"] == [None, None]
    line = ocr.page_fields(raw, MODEL_SIZE, PAGE_SIZE, TokenScores([0], [-0.1]))["lines"][0]
    assert line["word_confidences"] == [line["confidence"]] * 2 == [rounded(math.exp(-0.1))] * 2
    assert "confidence" not in ocr.page_fields(raw, MODEL_SIZE, PAGE_SIZE)["lines"][0]  # no scores: no field


def test_an_entity_takes_its_phrase_and_its_location_tokens(k2_tokenizer):
    """Kosmos-2: the prompt's text is not generated; an entity whose phrase the model wrote counts
    its phrase's tokens and its object's; one whose phrase the prompt gave counts its object only."""
    prompt = "<grounding><phrase> a snowman</phrase>"
    generated = [  # (text, the entity it belongs to)
        ("<object><patch_index_0044><patch_index_0863></object>", "snowman"),
        (" warming himself by", None),
        ("<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>", "fire"),
        (".", None),
    ]
    ids, owner = [], []
    for text, entity in generated:
        seg = k2_tokenizer.encode(text)
        ids += seg
        owner += [entity] * len(seg)
    logprobs = [-0.02 * (k % 5) - 0.01 for k in range(len(ids) + 1)]
    text = k2_tokenizer.decode(ids)
    raw = prompt + text
    fields = grounding.page_fields(raw, MODEL_SIZE, PAGE_SIZE, scores_for(k2_tokenizer, ids, logprobs, text, len(prompt)))
    assert fields["text"] == "a snowman warming himself by a fire."
    by_name = {e["text"]: e["confidence"] for e in fields["entities"]}
    for name in ("snowman", "fire"):
        assert by_name[f"a {name}"] == geometric_mean([lp for lp, o in zip(logprobs, owner) if o == name])


# --------------------------------------------------------------------------------------------------
# A checkpoint that writes a known transcript
# --------------------------------------------------------------------------------------------------



def test_a_known_transcript_end_to_end(scripted, tmp_path):
    """The installed pipeline on a checkpoint that writes three OCR lines with chosen token
    probabilities: the record's confidences are the geometric means of the oracle's probabilities
    (transformers' compute_transition_scores) over each page, line and word."""
    from tests.test_confidence import oracle_scores

    model, processor = load_kosmos2_5_oracle(scripted)
    image = noise_image(64, 48, seed=3)
    inputs = processor(text="<ocr>", images=image, return_tensors="pt")
    inputs.pop("width"), inputs.pop("height")
    ids, expected = oracle_scores(model, inputs, 64)
    assert ids == transcript_ids(scripted, TRANSCRIPT)  # the checkpoint does what it was built for

    result = kosmos("ocr", save(image, tmp_path / "page.png"), "--model", scripted, "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    (record,) = jsonl(result.stdout)
    assert [line["text"] for line in record["lines"]] == ["ab", "cd ef", "gh"]
    assert record["new_tokens"] == len(ids) == len(STRENGTHS)
    # Within 1e-3: the solved LM head's weights (up to ~25) make fp32 logits round differently in the
    # two implementations by up to ~1e-4 nats a token; the values below differ by 10% and more.
    close = lambda got, tokens: math.isclose(got, geometric_mean([expected[k] for k in tokens]), rel_tol=1e-3)
    assert close(record["confidence"], range(len(ids)))
    for line, tokens, words in zip(record["lines"], LINES, WORDS):
        assert close(line["confidence"], tokens)
        assert all(close(got, word) for got, word in zip(line["word_confidences"], words, strict=True))
    assert record["lines"][1]["word_confidences"][0] < 0.1 < 0.5 < record["lines"][1]["word_confidences"][1]


# --------------------------------------------------------------------------------------------------
# Whatever the batch; old state
# --------------------------------------------------------------------------------------------------


def _without_confidence(record: dict) -> tuple[dict, list[float]]:
    """The record with its confidences taken out, and those confidences in order."""
    values = [record.pop("confidence")]
    for part in record["lines"] + record["entities"]:
        values.append(part.pop("confidence"))
        values += part.pop("word_confidences", [])
    return record, values


def _records(task, folder, model, *options) -> list[tuple[dict, list[float]]]:
    result = kosmos(task, folder, "--model", model, "--format", "jsonl", "--max-new-tokens", "40", *options)
    assert result.exit_code == 0, result.stderr
    return [_without_confidence(record) for record in jsonl(result.stdout)]


def _same(run, reference) -> None:
    """Every field the same, the confidences up to float rounding."""
    assert [record for record, _ in run] == [record for record, _ in reference]
    for (_, got), (_, want) in zip(run, reference):
        assert len(got) == len(want) and all(math.isclose(a, b, rel_tol=2e-5) for a, b in zip(got, want))


@pytest.mark.parametrize("task", ["ocr", "md"])
def test_the_records_do_not_depend_on_the_batch_or_the_workers(kosmos25_sharded, tmp_path, monkeypatch, task):
    """Batch 1, batch 6 and two CPU workers: every field the same, and the confidences the same up to
    float rounding (in fp32 the kernels a batch shape picks sum in another order: up to 6e-6 nats a
    token measured; the values agree to 2e-5 relative). With a loop guard that finds a loop in some
    pages (their rows step on until the check, a number of steps that depends on the batch) too."""
    from kosmos_cli import pipeline
    from kosmos_cli.models.generation import LoopCheck

    for i, size in enumerate([(40, 30), (300, 120), (64, 640), (128, 128), (90, 200), (33, 33)]):
        save(noise_image(*size, seed=i), tmp_path / f"p{i}.png")
    alone = _records(task, tmp_path, kosmos25_sharded, "--batch-size", "1")
    _same(_records(task, tmp_path, kosmos25_sharded, "--batch-size", "2", "--device", "cpu,cpu"), alone)

    looping = LoopCheck(keep=lambda new: 7 if len(new) >= 10 and new[0] % 2 == 0 else None)
    monkeypatch.setattr(pipeline, "LOOP_GUARD", looping)
    alone = _records(task, tmp_path, kosmos25_sharded, "--batch-size", "1")
    assert {record["new_tokens"] for record, _ in alone} >= {7, 40}  # pages cut at a loop and pages not
    _same(_records(task, tmp_path, kosmos25_sharded, "--batch-size", "6"), alone)


def test_pages_stored_without_confidence_resume_as_unknown(kosmos25_tied, png, tmp_path):
    out = tmp_path / "out"
    first = kosmos("ocr", png, "--model", kosmos25_tied, "-o", out, *FAST)
    assert first.exit_code == 0, first.stderr
    stored = state_file(out, "ocr", "good", 1)
    record = json.loads(stored.read_text())
    assert record["confidence"] is not None and record["new_tokens"] >= 1
    for key in ("confidence", "new_tokens"):
        del record[key]
    stored.write_text(json.dumps(record))
    (out / "good.json").unlink()

    again = kosmos("ocr", png, "--model", kosmos25_tied, "-o", out, *FAST)
    assert again.exit_code == 0, again.stderr
    (page,) = json.loads((out / "good.json").read_text())["pages"]
    assert page["confidence"] is None and page["new_tokens"] is None

    fresh = kosmos("ocr", png, "--model", kosmos25_tied, "-o", out, "--overwrite", *FAST)
    assert fresh.exit_code == 0, fresh.stderr
    assert json.loads(stored.read_text())["confidence"] is not None



def test_the_known_transcript_in_every_document_file(scripted, tmp_path, alto_schema):
    """The same run writing hOCR, ALTO and an overlay: x_wconf, WC and PC carry the record's values,
    both files stay valid, and each polygon is drawn in its line's colour."""
    from lxml import etree
    from PIL import Image

    from kosmos_cli.writers.overlay import confidence_colour
    from tests.helpers.validators import ALTO, XHTML, assert_valid_alto, assert_valid_hocr

    out = tmp_path / "out"
    page = save(noise_image(64, 48, seed=3), tmp_path / "page.png")
    result = kosmos("ocr", page, "--model", scripted, "-o", out, "--outputs", "json,hocr,alto", "--overlay")
    assert result.exit_code == 0, result.stderr
    (record,) = json.loads((out / "page.json").read_text())["pages"]
    lines = record["lines"]
    assert [line["text"] for line in lines] == ["ab", "cd ef", "gh"]

    assert_valid_hocr(out / "page.hocr")
    hocr = etree.parse(str(out / "page.hocr"))
    wconf = lambda el: int(el.get("title").rsplit("x_wconf ", 1)[1])
    hocr_lines = hocr.findall(f".//{XHTML}span[@class='ocr_line']")
    assert [wconf(el) for el in hocr_lines] == [round(100 * line["confidence"]) for line in lines]
    assert [[wconf(w) for w in el.findall(f"{XHTML}span[@class='ocrx_word']")] for el in hocr_lines] == \
        [[round(100 * c) for c in line["word_confidences"]] for line in lines]

    alto = (out / "page.alto.xml").read_text()
    assert_valid_alto(alto_schema, alto)
    tree = etree.fromstring(alto.encode())
    assert float(tree.find(f".//{ALTO}Page").get("PC")) == pytest.approx(record["confidence"], rel=1e-5)
    assert [float(s.get("WC")) for s in tree.iter(f"{ALTO}String")] == \
        pytest.approx([c for line in lines for c in line["word_confidences"]], rel=1e-5)

    overlay = Image.open(out / "page.overlay-0001.png").convert("RGB")
    colours = [confidence_colour(line["confidence"]) for line in lines]
    assert len(set(colours)) >= 2  # the lines' values fall in different bins
    for line, colour in zip(lines, colours):
        x0, y0, x1 = line["polygon"][0], line["polygon"][1], line["polygon"][2]
        assert overlay.getpixel(((x0 + x1) // 2, y0)) == colour
