"""Kosmos-2 tokenizer and prompt builder against transformers' Kosmos2Processor (the oracle).

The checkpoint is the tiny one from `tests/helpers/kosmos2.py`, in the Hub repo's file layout; the
oracle loads it the way transformers 5.x loads the real one (TokenizersBackend over tokenizer.json,
tag tokens re-registered by the processor).
"""

from __future__ import annotations

import json
import random
import shutil

import pytest

pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from kosmos_cli.processing.kosmos2 import Kosmos2Tokenizer  # noqa: E402
from tests.helpers.hub import added_tokens_decoder_block  # noqa: E402
from tests.helpers.kosmos2 import SNOWMAN, load_kosmos2_oracle, load_kosmos2_processor  # noqa: E402

TEXTS = [
    "",
    " ",
    "   ",
    "<grounding> An image of",
    "<grounding>An image of",
    "An image of",
    "  leading and trailing spaces  ",
    "multiple   inner    spaces",
    "trailing space ",
    "tab\tnew\nline\r\nend",
    SNOWMAN,
    "<grounding><phrase> Two puppies </phrase> sit in a field of <phrase> grass </phrase>.",
    "<grounding> <phrase> Two puppies </phrase> <object> <patch_index_0079> <patch_index_1016> "
    "</delimiter_of_multi_objects/> <patch_index_0135> <patch_index_1008> </object> sit.",
    "<phrase>a dog</phrase><object><patch_index_0001><patch_index_0002></delimiter_of_multi_objects/>"
    "<patch_index_0003><patch_index_0004></object>",
    "<patch_index_1024> is not a token, <patch_index_12> neither, <patch_index_0012> is",
    "Hello, world! How are you? I'm fine; it's 3.14 -- isn't it? (yes) [no] {maybe} \"quoted\" 'single'",
    "Это изображение снеговика, который греется у костра.",
    "Μια εικόνα ενός χιονάνθρωπου που ζεσταίνεται δίπλα σε μια φωτιά.",
    "这是一张雪人在火边取暖的图片。你好，世界！",
    "これは火のそばで暖まっている雪だるまの画像です。",
    "صورة لرجل ثلج يدفئ نفسه بجانب النار.",
    "Café naïve façade über Straße, e\u0301 (combining), ﬁ ligature, ① ＦＵＬＬＷＩＤＴＨ",
    "emoji 😀😀 and unknown 🦄 glyphs",
    "ideographic\u3000space, nbsp\u00a0here, line\u2028separator, nel\u0085char, zero\u200bwidth",
    "control\x00chars\x07here\x7f",
    "<s>explicit specials</s><pad><unk>",
    "a <mask> b\u2581<mask> c",
    "\u2581literal \u2581\u2581 underlines\u2581",
    "<image></image><image> a </image>",
    "</doc></chunk></line> tags <grounding>",
    "< not a tag > <phrase <object",
]


@pytest.fixture(scope="module")
def oracle(k2_dir):
    return load_kosmos2_processor(k2_dir)


@pytest.fixture(scope="module")
def tok(k2_dir):
    return Kosmos2Tokenizer.from_dir(k2_dir)


def _oracle_encode(processor, text):
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------ ids
def test_id_layout_matches_files_and_oracle(tok, oracle, k2_dir):
    t = oracle.tokenizer
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (
        t.bos_token_id,
        t.pad_token_id,
        t.eos_token_id,
        t.unk_token_id,
    )
    assert tok.mask_id == t.convert_tokens_to_ids("<mask>") == tok.base_vocab_size - 1
    assert tok.image_start_id == t.convert_tokens_to_ids("<image>")
    assert tok.image_end_id == t.convert_tokens_to_ids("</image>")
    assert tok.vocab_size == len(t)
    config = json.loads((k2_dir / "config.json").read_text())
    assert tok.vocab_size == config["text_config"]["vocab_size"]
    added = json.loads((k2_dir / "added_tokens.json").read_text())
    for content, id_ in added.items():
        assert tok.token_to_id(content) == id_ == t.convert_tokens_to_ids(content)
        assert tok.id_to_token(id_) == content
    # sentencepiece piece p -> p + 1
    for i in (4, 5, 10, tok.base_vocab_size - 2):
        assert tok.id_to_token(i) == t.convert_ids_to_tokens(i)
        assert tok.token_to_id(tok.id_to_token(i)) == i
    assert tok.token_to_id("definitely-not-a-piece") is None
    with pytest.raises(KeyError):
        tok.id_to_token(10**7)


# ------------------------------------------------------------------------------------------ encode
@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_oracle(tok, oracle, text):
    assert tok.encode(text) == _oracle_encode(oracle, text)


def test_encode_random_strings_match_oracle(tok, oracle):
    rng = random.Random(1234)
    atoms = list("abcxyzAEI.,;:!?'\"-()0123456789") + [
        " ", "  ", "\t", "\n", "\u3000", "\u00a0", "\u0085", "\u2028", "\x07", "\u2581",
        "é", "e\u0301", "Ж", "ы", "雪", "人", "😀", "ﬁ", "①", "Ｈ", "<", ">", "/",
        "<phrase>", "</phrase>", "<object>", "</object>", "<patch_index_0012>", "<patch_index_1023>",
        "</delimiter_of_multi_objects/>", "<s>", "</s>", "<pad>", "<unk>", "<mask>", "<grounding>",
        "<image>", "</image>", " n't", " 's", " snowman", " fire", "изображение", "χιονάνθρωπου",
    ]  # fmt: skip
    texts = ["".join(rng.choice(atoms) for _ in range(rng.randint(0, 24))) for _ in range(1500)]
    mismatches = [t for t in texts if tok.encode(t) != _oracle_encode(oracle, t)]
    assert mismatches == []


def test_encode_shape_facts(tok):
    # Tags swallow the whitespace on their left; a trailing space becomes a lone "▁" piece.
    assert tok.encode("a <phrase>") == tok.encode("a<phrase>")
    assert tok.encode("a ")[-1] == tok.token_to_id("\u2581")
    assert tok.encode(" a") == tok.encode("a")
    assert tok.encode("<grounding>") == [tok.token_to_id("<grounding>")]


# ------------------------------------------------------------------------------------------ prompt
@pytest.mark.parametrize(
    "text",
    [
        "<grounding> An image of",
        "<grounding>An image of",
        "An image of",
        "  <grounding> Describe this image in detail:  ",
        "<grounding> Question: What is special about this image? Answer:",
        "",
        "   ",
        SNOWMAN,
        "Это изображение",
        "trailing newline\n",
        "<image></image> images inside the text <image>",
        "<s> a </s>",
    ],
)
def test_prompt_matches_processor(tok, oracle, text):
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    expected = oracle(text=text, images=image)
    ids, mask = tok.prompt(text)
    assert ids == list(expected["input_ids"])
    assert mask == list(expected["image_embeds_position_mask"])
    assert len(ids) == len(mask)


def test_prompt_layout(tok):
    ids, mask = tok.prompt("<grounding> An image of")
    assert ids[:2] == [tok.bos_id, tok.image_start_id]
    assert ids[2:66] == list(range(4, 68))
    assert ids[66] == tok.image_end_id
    assert ids[67] == tok.token_to_id("<grounding>")
    assert ids[-1] != tok.eos_id  # no EOS: generation continues the text
    assert mask == [0, 0] + [1] * 64 + [0] * (len(ids) - 66)
    ids8, mask8 = tok.prompt("x", num_image_tokens=8)
    assert ids8[2:10] == list(range(4, 12)) and ids8[10] == tok.image_end_id
    assert sum(mask8) == 8 and mask8[2:10] == [1] * 8


def test_prompt_batch_matches_processor(tok, oracle):
    texts = ["<grounding> An image of", "<grounding> Describe this image in detail:"]
    images = [Image.new("RGB", (32, 32)), Image.new("RGB", (48, 24))]
    expected = oracle(text=texts, images=images)
    for i, text in enumerate(texts):
        ids, mask = tok.prompt(text)
        # The processor right-pads a batch to its longest prompt (pad id 1, mask 0, attention 0).
        n = sum(expected["attention_mask"][i])
        assert n == len(ids)
        assert ids == list(expected["input_ids"][i][:n])
        assert mask == list(expected["image_embeds_position_mask"][i][:n])
        assert set(expected["input_ids"][i][n:]) <= {tok.pad_id}


# ------------------------------------------------------------------------------------------ decode
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_decode_of_encoded_text_matches_oracle(tok, oracle, text, skip):
    ids = _oracle_encode(oracle, text)
    assert tok.decode(ids, skip_special_tokens=skip) == oracle.tokenizer.decode(ids, skip_special_tokens=skip)


def test_decode_prompt_matches_oracle(tok, oracle):
    ids, _ = tok.prompt(SNOWMAN)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == oracle.batch_decode([ids], skip_special_tokens=skip)[0]
    # Tags stay in the text (the grounding parser needs them); <s> goes.
    text = tok.decode(ids)
    assert text.startswith("<image>") and "</image><grounding> An image of<phrase> a snowman</phrase>" in text


def test_decode_random_ids_match_oracle(tok, oracle):
    rng = random.Random(99)
    n = tok.vocab_size
    seqs = [
        [rng.randrange(n) if rng.random() < 0.4 else rng.randrange(min(n, 300)) for _ in range(rng.randint(0, 24))]
        for _ in range(1500)
    ]
    for skip in (True, False):
        ours = [tok.decode(s, skip_special_tokens=skip) for s in seqs]
        assert ours == oracle.batch_decode(seqs, skip_special_tokens=skip)


def test_decode_ignores_out_of_range_ids(tok, oracle):
    assert tok.decode([10**6]) == oracle.tokenizer.decode([10**6]) == ""
    assert tok.decode([5, 10**6, 6]) == oracle.tokenizer.decode([5, 10**6, 6])


# ------------------------------------------------------------------------------------------ file variants
def _variant(src, dst, edit_tokenizer_json=None, edit_tokenizer_config=None):
    """Copy the tokenizer-side files of `src` into `dst` (no weights) and edit them."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in (
        "config.json",
        "sentencepiece.bpe.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "preprocessor_config.json",
    ):
        shutil.copy(src / name, dst / name)
    for name, edit in (("tokenizer.json", edit_tokenizer_json), ("tokenizer_config.json", edit_tokenizer_config)):
        if edit is not None:
            data = json.loads((dst / name).read_text(encoding="utf-8"))
            edit(data)
            (dst / name).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return dst


def _modern_normalizer(tj):
    # What newer transformers conversions write: strip right, collapse spaces into "▁".
    charsmap = tj["normalizer"]["normalizers"][0]
    tj["normalizer"]["normalizers"] = [
        charsmap,
        {"type": "Strip", "strip_left": False, "strip_right": True},
        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "\u2581"},
    ]


def _whitespace_split(tj):
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, tj["pre_tokenizer"]]}


def _legacy_metaspace(tj):
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}
    tj["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}


def _tags_special(tj):
    for t in tj["added_tokens"]:
        if t["id"] >= 5 and t["content"] != "<mask>":
            t["special"] = True


def _with_added_tokens_decoder(tc, k2_dir):
    tj = json.loads((k2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tc["added_tokens_decoder"] = added_tokens_decoder_block(tj["added_tokens"])


@pytest.mark.parametrize(
    "variant", ["added_tokens_decoder", "modern_normalizer", "whitespace_split", "legacy_metaspace", "tags_special"]
)
def test_file_variants_match_oracle(k2_dir, tmp_path, variant):
    edits = {
        "added_tokens_decoder": dict(edit_tokenizer_config=lambda tc: _with_added_tokens_decoder(tc, k2_dir)),
        "modern_normalizer": dict(edit_tokenizer_json=_modern_normalizer),
        "whitespace_split": dict(edit_tokenizer_json=_whitespace_split),
        "legacy_metaspace": dict(edit_tokenizer_json=_legacy_metaspace),
        "tags_special": dict(edit_tokenizer_json=_tags_special),
    }[variant]
    path = _variant(k2_dir, tmp_path / variant, **edits)
    processor = load_kosmos2_processor(path)
    tok = Kosmos2Tokenizer.from_dir(path)
    for text in TEXTS:
        ids = _oracle_encode(processor, text)
        assert tok.encode(text) == ids, text
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == processor.tokenizer.decode(
                ids, skip_special_tokens=skip
            ), (text, skip)
    image = Image.new("RGB", (20, 20))
    expected = processor(text=SNOWMAN, images=image)
    assert tok.prompt(SNOWMAN) == (list(expected["input_ids"]), list(expected["image_embeds_position_mask"]))


def test_tags_flagged_special_are_dropped_by_decode(k2_dir, tmp_path):
    tok = Kosmos2Tokenizer.from_dir(_variant(k2_dir, tmp_path / "special", edit_tokenizer_json=_tags_special))
    ids = tok.encode(SNOWMAN)
    assert "<phrase>" not in tok.decode(ids) and "<phrase>" in tok.decode(ids, skip_special_tokens=False)


def test_without_tokenizer_json_uses_released_pipeline(k2_dir, tmp_path, tok):
    path = _variant(k2_dir, tmp_path / "no_json")
    (path / "tokenizer.json").unlink()
    bare = Kosmos2Tokenizer.from_dir(path)
    for text in TEXTS:
        assert bare.encode(text) == tok.encode(text)
    assert bare.vocab_size == tok.vocab_size


def test_missing_tag_ids_are_appended_in_order(k2_dir, tmp_path, tok):
    # Without any file naming them, the tags get the next ids in registration order, as the
    # processor's add_tokens would give them.
    path = _variant(k2_dir, tmp_path / "no_tags")
    (path / "tokenizer.json").unlink()
    (path / "added_tokens.json").unlink()
    bare = Kosmos2Tokenizer.from_dir(path)
    assert bare.token_to_id("</doc>") == bare.base_vocab_size
    assert bare.token_to_id("<patch_index_1023>") == bare.vocab_size - 1
    assert bare.vocab_size == tok.vocab_size
    assert bare.encode(SNOWMAN) == tok.encode(SNOWMAN)


def test_unsupported_pipeline_is_refused(k2_dir, tmp_path):
    def byte_level(tj):
        tj["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False}

    with pytest.raises(NotImplementedError):
        Kosmos2Tokenizer.from_dir(_variant(k2_dir, tmp_path / "bytelevel", edit_tokenizer_json=byte_level))


def test_missing_sentencepiece_model(tmp_path):
    with pytest.raises(FileNotFoundError):
        Kosmos2Tokenizer.from_dir(tmp_path)


# ------------------------------------------------------------------------------------------ fixture
def test_checkpoint_fixture_greedy_output_depends_on_image(k2_dir, tok):
    import numpy as np
    import torch

    model, processor = load_kosmos2_oracle(k2_dir)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)),
        Image.new("RGB", (224, 224), (250, 20, 20)),
    ]
    outputs = []
    for image in images:
        inputs = processor(text="<grounding> An image of", images=image, return_tensors="pt")
        ids, mask = tok.prompt("<grounding> An image of")
        assert inputs["input_ids"][0].tolist() == ids and inputs["image_embeds_position_mask"][0].tolist() == mask
        with torch.no_grad():
            out = model.generate(
                pixel_values=inputs["pixel_values"],
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                image_embeds_position_mask=inputs["image_embeds_position_mask"],
                max_new_tokens=12,
                do_sample=False,
                no_repeat_ngram_size=3,
            )
        outputs.append(out[0, len(ids) :].tolist())
        # Our decode of real generate() output equals the processor's.
        assert tok.decode(out[0].tolist()) == processor.batch_decode(out, skip_special_tokens=True)[0]
    assert outputs[0] != outputs[1]
