"""Kosmos-2.5 tokenizer and prompts against transformers' Kosmos2_5Processor, plus the fixtures' layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from kosmos_cli.processing.kosmos2_5 import (
    MARKDOWN_PROMPT,
    OCR_PROMPT,
    Kosmos25Tokenizer,
    chat_prompt,
)
from tests.helpers.kosmos2_5 import (
    build_kosmos2_5_tokenizer_config,
    build_kosmos2_5_tokenizer_json,
    load_kosmos2_5_oracle,
    load_kosmos2_5_processor,
)

TEXTS = [
    OCR_PROMPT,
    MARKDOWN_PROMPT,
    chat_prompt("What's the total, in dollars? (2 items!) -- see 'Sub Total'; e.g. $45.50"),
    "Invoice 2024-0117: 1,234.56 USD, 3.14159 and 100000000",
    "Größe 東京 Ωmega — naïve café ✓ 🙂",
    "",
    "  leading spaces\n\ttabs and\r\nnewlines  ",
    "<md><bbox><x_12><y_7></bbox> mixed tags",
]


@pytest.fixture(scope="module")
def processor(kosmos25_tied):
    return load_kosmos2_5_processor(kosmos25_tied)


@pytest.fixture(scope="module")
def ours(kosmos25_tied):
    return Kosmos25Tokenizer.from_dir(kosmos25_tied)


def _page(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (90, 130, 3), dtype=np.uint8))


def test_special_ids_come_from_the_files(ours, processor, kosmos25_tied):
    tok = processor.tokenizer
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert ours.image_start_id == tok.convert_tokens_to_ids(processor.image_start_token)
    assert ours.image_end_id == tok.convert_tokens_to_ids(processor.image_end_token)
    assert ours.image_placeholder_id == tok.convert_tokens_to_ids(processor.image_token)
    config = json.loads((kosmos25_tied / "config.json").read_text())
    assert ours.vocab_size == len(tok) == config["text_config"]["vocab_size"]
    # The real file's layout (REFERENCE §3), relative to the BPE size.
    n_bpe = ours.token_to_id("<mask>") - 4
    assert [ours.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert ours.image_start_id == n_bpe + 6 and ours.image_end_id == n_bpe + 7
    assert ours.token_to_id("<md>") == n_bpe + 11
    assert ours.token_to_id("<x_5>") == n_bpe + 12 + 10 and ours.token_to_id("<y_5>") == n_bpe + 12 + 11
    assert ours.token_to_id("<y_4095>") == ours.vocab_size - 1


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(ours, processor, text):
    tok = processor.tokenizer
    assert ours.encode(text) == tok(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text) == tok(text)["input_ids"]  # nothing is added around plain text


@pytest.mark.parametrize("text", TEXTS)
def test_prompt_matches_processor(ours, processor, text):
    n = processor.num_image_tokens
    expected = processor(text=text, images=_page())
    ids, mask = ours.prompt(text, n)
    assert ids == expected["input_ids"][0].tolist()
    assert mask == expected["image_embeds_position_mask"][0].tolist()
    assert ids[:2] == [ours.bos_id, ours.image_start_id] and ids[n + 2] == ours.image_end_id
    assert mask == [0, -1] + [1] * n + [-1] + [0] * len(ours.encode(text))


def test_prompt_with_2048_image_tokens(ours, kosmos25_tied):
    """The released model's N; only the tokenizer is involved, so any checkpoint will do."""
    processor = load_kosmos2_5_processor(kosmos25_tied, num_image_tokens=2048)
    expected = processor(text=OCR_PROMPT, images=_page())
    ids, mask = ours.prompt(OCR_PROMPT, 2048)
    assert ids == expected["input_ids"][0].tolist()
    assert mask == expected["image_embeds_position_mask"][0].tolist()


def _decode_cases(t: Kosmos25Tokenizer) -> list[list[int]]:
    coord = [t.token_to_id(s) for s in ("<bbox>", "<x_12>", "<y_573>", "<x_4095>", "<y_0>", "</bbox>")]
    ocr = t.prompt(OCR_PROMPT, 16)[0] + coord + t.encode("Total 50,000\n") + coord + t.encode("1") + [t.eos_id]
    md = [t.token_to_id("<md>")] + t.encode("# Größe\n- **1 \\[REG\\]** 45,455 東京") + [t.eos_id, t.pad_id, t.pad_id]
    odd = [t.token_to_id(s) for s in ("<mask>", "</chunk>", "<unk>", "<image>", "</image>", "<ocr>")]
    return [
        ocr,
        md,
        odd + t.encode(" tail") + [t.pad_id],
        [t.eos_id],
        [],
        t.encode("Ωmega 🙂")[:-1],  # a cut multi-byte character
    ]


def test_decode_matches_processor_batch_decode(ours, processor):
    cases = _decode_cases(ours)
    expected = processor.batch_decode(cases, skip_special_tokens=True)
    assert [ours.decode(ids) for ids in cases] == expected
    # The behaviour the tasks rely on: box tokens stay, prompt/control tokens go.
    ocr_text = ours.decode(cases[0])
    assert ocr_text.startswith("<bbox><x_12><y_573><x_4095><y_0></bbox>Total 50,000\n")
    assert "<s>" not in ocr_text and "</s>" not in ocr_text and "<image>" not in ocr_text


def test_chat_prompt():
    text = chat_prompt("How much?")
    assert text.startswith("<md>A chat between a curious user") and text.endswith("USER: How much? ASSISTANT:")


def _write_tokenizer_dir(path, specials=None, flip_flags=()):
    tj = build_kosmos2_5_tokenizer_json(specials)
    tc = build_kosmos2_5_tokenizer_config(tj)
    for content in flip_flags:  # tokenizer_config.json disagrees with tokenizer.json about `special`
        entry = next(e for e in tc["added_tokens_decoder"].values() if e["content"] == content)
        entry["special"] = not entry["special"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (path / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False))
    return path


def test_other_special_ids_and_flags(tmp_path):
    """Ids are read, not assumed; tokenizer_config.json's flags win over tokenizer.json's, as in transformers."""
    from transformers import AutoTokenizer, Kosmos2_5ImageProcessorPil, Kosmos2_5Processor

    path = _write_tokenizer_dir(
        tmp_path / "tok", specials=["<pad>", "</s>", "<unk>", "<s>"], flip_flags=("</chunk>", "<bbox>")
    )
    ours = Kosmos25Tokenizer.from_dir(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.image_placeholder_id) == (3, 1, 0, 3)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    processor = Kosmos2_5Processor(Kosmos2_5ImageProcessorPil(max_patches=64), tok, num_image_tokens=4)
    for text in (OCR_PROMPT, chat_prompt("Why?")):
        expected = processor(text=text, images=_page(), max_patches=64)
        ids, mask = ours.prompt(text, 4)
        assert ids == expected["input_ids"][0].tolist()
        assert mask == expected["image_embeds_position_mask"][0].tolist()
    cases = _decode_cases(ours)
    assert [ours.decode(ids) for ids in cases] == tok.batch_decode(cases, skip_special_tokens=True)
    # The config made <bbox> special, so decode drops it. (Making </chunk> non-special changes nothing:
    # the backend never forgets a token was special, in transformers as here.)
    assert "<bbox>" not in ours.decode(cases[0]) and "<x_12>" in ours.decode(cases[0])


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError):
        Kosmos25Tokenizer.from_dir(tmp_path)


# --------------------------------------------------------------------------------------------------
# The fixtures themselves
# --------------------------------------------------------------------------------------------------


def _tensor_names(path) -> dict[str, str]:
    from safetensors import safe_open

    names = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            names.update({k: f.name for k in sf.keys()})
    return names


def test_tied_checkpoint_has_no_lm_head(kosmos25_tied):
    files = sorted(p.name for p in kosmos25_tied.iterdir())
    assert files == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    names = _tensor_names(kosmos25_tied)
    assert "text_model.model.embed_tokens.weight" in names and "text_model.lm_head.weight" not in names
    config = json.loads((kosmos25_tied / "config.json").read_text())
    assert config["model_type"] == "kosmos-2.5" and {"text_config", "vision_config", "latent_query_num"} <= set(config)


def test_sharded_checkpoint_has_shards_and_index(kosmos25_sharded):
    shards = sorted(p.name for p in kosmos25_sharded.glob("model-*-of-*.safetensors"))
    n = len(shards)
    assert n >= 2 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not (kosmos25_sharded / "model.safetensors").exists()
    index = json.loads((kosmos25_sharded / "model.safetensors.index.json").read_text())
    names = _tensor_names(kosmos25_sharded)
    assert index["weight_map"] == names
    assert "text_model.lm_head.weight" in names


def test_processor_config_layout(kosmos25_processor_layout, kosmos25_tied):
    from transformers import AutoProcessor

    assert not (kosmos25_processor_layout / "preprocessor_config.json").exists()
    nested = json.loads((kosmos25_processor_layout / "processor_config.json").read_text())
    assert nested["image_processor"]["max_patches"] == 256
    processor = AutoProcessor.from_pretrained(kosmos25_processor_layout, backend="pil")
    assert processor.num_image_tokens == 16 and processor.image_processor.max_patches == 256
    # Same weights and tokenizer as the tied fixture: only the processor file differs.
    assert _tensor_names(kosmos25_processor_layout) == _tensor_names(kosmos25_tied)
    ours = Kosmos25Tokenizer.from_dir(kosmos25_processor_layout)
    expected = processor(text=MARKDOWN_PROMPT, images=_page())
    assert ours.prompt(MARKDOWN_PROMPT, 16)[0] == expected["input_ids"][0].tolist()


def _two_pages() -> list[Image.Image]:
    a = Image.new("RGB", (320, 200), "white")
    draw = ImageDraw.Draw(a)
    draw.text((10, 10), "Total 50,000", fill="black")
    draw.rectangle((50, 80, 200, 150), fill=(200, 30, 30))
    b = Image.fromarray(np.random.RandomState(1).randint(0, 255, (240, 180, 3), dtype=np.uint8))
    return [a, b]


def test_sharded_checkpoint_output_depends_on_the_image(kosmos25_sharded):
    model, processor = load_kosmos2_5_oracle(kosmos25_sharded)
    outputs = []
    for image in _two_pages():
        inputs = processor(text=OCR_PROMPT, images=image)
        inputs.pop("width"), inputs.pop("height")
        assert inputs["flattened_patches"].shape == (1, 256, 770)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
        outputs.append(out[0, inputs["input_ids"].shape[1] :].tolist())
    assert all(len(o) == 20 for o in outputs)  # no early EOS
    assert outputs[0] != outputs[1]
