"""Builder of a tiny random Kosmos-2 checkpoint in the layout of `microsoft/kosmos-2-patch14-224`, and
its oracle loaders.

Files written (as in the Hub repo, REFERENCE §1):
config.json (model_type "kosmos-2"), model.safetensors, sentencepiece.bpe.model, tokenizer.json,
tokenizer_config.json, special_tokens_map.json, added_tokens.json, preprocessor_config.json,
generation_config.json.

Where the file contents come from (found with the search tools; the real repo cannot be downloaded
here):
- preprocessor_config.json: the Hub page huggingface.co/microsoft/kosmos-2-patch14-224 (blame view of
  preprocessor_config.json, 534 bytes): CLIPImageProcessor, size {"shortest_edge": 224},
  crop_size 224x224, do_center_crop true, use_square_size true, resample 3 (bicubic), CLIP mean/std.
- special_tokens_map.json, tokenizer_config.json, generation_config.json, added_tokens.json: the
  files of ydshieh/kosmos-2-patch14-224, the staging repo the Microsoft one was published from
  (same 279-byte special_tokens_map.json with `<mask>` lstrip=true, normalized=true; tokenizer_config
  with clean_up_tokenization_spaces=true and processor_class Kosmos2Processor; generation_config with
  bos 0, pad 1, eos 2, no_repeat_ngram_size 3, use_cache true; added_tokens.json mapping the 1035
  tag/patch-index tokens to ids from 64002 on).  The staging repo names a custom
  "Kosmos2Tokenizer" class; the released repo loads with transformers' XLMRobertaTokenizer, which
  is what we write.  Whether the released tokenizer_config.json also carries an
  `added_tokens_decoder` block is not known, so the builder can write either variant.
- tokenizer.json: the Hub repo ships one (4.7 MB, a `tokenizers` Unigram with the sentencepiece
  scores, the precompiled normaliser char map, a Metaspace pre-tokenizer and the added tokens).  It
  matters: transformers 5.x reads it and needs `protobuf` only when it has to convert the
  sentencepiece model itself.
- sentencepiece.bpe.model: XLM-RoBERTa's model is a *unigram* sentencepiece model despite its name
  (transformers' XLMRobertaTokenizer builds a Unigram backend from it); ours is a unigram model
  trained at build time on a small English + non-Latin corpus.

The model comes from transformers' own `Kosmos2ForConditionalGeneration` (fp32, seeded), so the
oracle and our loader read exactly the same files.  Vision tower: image 224, patch 14 like the real
one (256 patches + CLS), tiny widths.  latent_query_num stays 64 because the processor always makes
64 image slots.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from tests.helpers.hub import (
    FAIRSEQ_SPECIALS,
    added_token,
    added_tokens_decoder_block,
    check_builder_args,
    check_hub_layout,
    load_oracle_model,
    load_processor,
    save_random_model,
    tiny_text_config,
    write_json,
)

TAG_TOKENS = [
    "</doc>",
    "<image>",
    "</image>",
    "</chunk>",
    "</line>",
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "</delimiter_of_multi_objects/>",
    "<grounding>",
]
NUM_PATCH_INDEX_TOKENS = 1024
LATENT_QUERY_NUM = 64

# A grounded answer: the snowman example of transformers' Kosmos-2 documentation.
SNOWMAN = (
    "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>"
    " warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>."
)

# Our own little multilingual corpus for the sentencepiece model: captions, punctuation, digits,
# and Cyrillic, Greek, CJK, Arabic, accented Latin text.
_CORPUS = """
An image of a snowman warming himself by a fire. A snowman next to a fire in the snow.
Two puppies sit in a field of grass. A dog runs on the beach; a cat sleeps on the sofa.
The quick brown fox jumps over the lazy dog while a man rides a horse at sunset.
A woman holding an umbrella walks down a busy street in the rain, next to a red bus.
A plate of food with rice, vegetables and chicken on a wooden table. Two people play tennis.
It's a sunny day! Isn't it? We're here, they've gone, I'm fine: 42 apples, 3.14 pies, 100%.
Describe this image in detail. What is in the picture? Where is the cat? Who is smiling?
Это изображение снеговика, который греется у костра. Две собаки сидят на траве.
Μια εικόνα ενός χιονάνθρωπου που ζεσταίνεται δίπλα σε μια φωτιά. Καλημέρα κόσμε.
这是一张雪人在火边取暖的图片。两只小狗坐在草地上。你好，世界！
これは火のそばで暖まっている雪だるまの画像です。犬が公園で走っています。
صورة لرجل ثلج يدفئ نفسه بجانب النار. كلبان يجلسان على العشب.
Une image d'un bonhomme de neige qui se réchauffe près d'un feu. Café, naïve, façade, über, Straße.
"""


def _train_sentencepiece(vocab_size: int = 400) -> bytes:
    """Train a tiny unigram sentencepiece model (default nmt_nfkc normaliser); return the proto bytes."""
    import sentencepiece as spm

    lines = [line.strip() for line in _CORPUS.splitlines() if line.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4),
        model_writer=out,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        # sentencepiece's defaults, spelled out: <unk>=0 <s>=1 </s>=2, as in XLM-R's model.
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()


def _proto_fields(buf: bytes):
    """Minimal protobuf wire-format reader: yields (field number, value) of one message."""
    pos = 0

    def varint():
        nonlocal pos
        result = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return result

    while pos < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n = varint()
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def _precompiled_charsmap(model_proto: bytes) -> bytes:
    """ModelProto.normalizer_spec (field 3) .precompiled_charsmap (field 2)."""
    for number, value in _proto_fields(model_proto):
        if number == 3:
            for sub_number, sub_value in _proto_fields(value):
                if sub_number == 2:
                    return bytes(sub_value)
    return b""


def write_kosmos2_tokenizer(path: Path, *, added_tokens_decoder: bool = False) -> int:
    """Write the tokenizer files of the Hub repo into `path`; return the total number of ids."""
    import sentencepiece as spm

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    proto = _train_sentencepiece()
    (path / "sentencepiece.bpe.model").write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    n_pieces = sp.get_piece_size()

    # fairseq layout: <s> <pad> </s> <unk>, then sentencepiece pieces 3.. (id + 1), then <mask>.
    vocab = [[tok, 0.0] for tok in FAIRSEQ_SPECIALS]
    vocab += [[sp.id_to_piece(i), sp.get_score(i)] for i in range(3, n_pieces)]
    mask_id = len(vocab)
    vocab.append(["<mask>", 0.0])
    first_tag_id = len(vocab)
    tags = TAG_TOKENS + [f"<patch_index_{i:04d}>" for i in range(NUM_PATCH_INDEX_TOKENS)]

    added = [added_token(i, tok, special=True) for i, tok in enumerate(FAIRSEQ_SPECIALS)]
    added.append(added_token(mask_id, "<mask>", special=True, lstrip=True, normalized=True))
    # Saved before transformers knew better, the tags are plain added tokens (normalized, no lstrip);
    # Kosmos2Processor re-registers them with lstrip=True at load time.
    added += [
        added_token(first_tag_id + i, tok, special=False, normalized=True)
        for i, tok in enumerate(tags)
    ]

    metaspace = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    template = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "</s>", "type_id": 0}},
        ],
        "pair": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "</s>", "type_id": 0}},
            {"SpecialToken": {"id": "</s>", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 0}},
            {"SpecialToken": {"id": "</s>", "type_id": 0}},
        ],
        "special_tokens": {
            "<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]},
            "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]},
        },
    }
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {
                    "type": "Precompiled",
                    "precompiled_charsmap": base64.b64encode(_precompiled_charsmap(proto)).decode("ascii"),
                },
                {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
            ],
        },
        "pre_tokenizer": metaspace,
        "post_processor": template,
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": 3, "vocab": vocab, "byte_fallback": False},
    }
    write_json(path / "tokenizer.json", tokenizer_json, indent=None)
    write_json(path / "added_tokens.json", {tok: first_tag_id + i for i, tok in enumerate(tags)}, sort_keys=True)
    mask = {"content": "<mask>", "lstrip": True, "normalized": True, "rstrip": False, "single_word": False}
    special_map = {
        "bos_token": "<s>",
        "cls_token": "<s>",
        "eos_token": "</s>",
        "mask_token": mask,
        "pad_token": "<pad>",
        "sep_token": "</s>",
        "unk_token": "<unk>",
    }
    write_json(path / "special_tokens_map.json", special_map)
    tokenizer_config = {
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": True,
        "cls_token": "<s>",
        "eos_token": "</s>",
        "mask_token": {"__type": "AddedToken", **mask},
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "processor_class": "Kosmos2Processor",
        "sep_token": "</s>",
        "sp_model_kwargs": {},
        "tokenizer_class": "XLMRobertaTokenizer",
        "unk_token": "<unk>",
    }
    if added_tokens_decoder:
        tokenizer_config["added_tokens_decoder"] = added_tokens_decoder_block(added)
    write_json(path / "tokenizer_config.json", tokenizer_config)
    return first_tag_id + len(tags)


def _tiny_config(vocab_size: int, *, tied: bool):
    from transformers import Kosmos2Config

    text = tiny_text_config(vocab_size, tied=tied, max_position_embeddings=2048, layerdrop=0.0)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=14,
        attention_dropout=0.0,
    )
    return Kosmos2Config(
        text_config=text, vision_config=vision, latent_query_num=LATENT_QUERY_NUM, tie_word_embeddings=tied
    )


def make_kosmos2_checkpoint(
    path: Path,
    *,
    seed: int = 0,
    tied: bool = False,
    image_dependent: bool = True,
    added_tokens_decoder: bool = False,
) -> Path:
    """Write a tiny random Kosmos-2 checkpoint in the Hub layout into `path`; return `path`.

    tied: lm_head shares embed_tokens and is absent from model.safetensors (as in the real repo).
    image_dependent: rescale weights so greedy output changes with the image (needs tied=False).
    added_tokens_decoder: also write the transformers>=4.34 `added_tokens_decoder` block into
        tokenizer_config.json (the ids and flags are the same either way).
    """
    from transformers import Kosmos2ForConditionalGeneration

    check_builder_args(tied=tied, image_dependent=image_dependent)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = write_kosmos2_tokenizer(path, added_tokens_decoder=added_tokens_decoder)
    config = _tiny_config(vocab_size, tied=tied)
    save_random_model(path, Kosmos2ForConditionalGeneration, config, seed=seed, image_dependent=image_dependent)

    generation_config = {
        "_from_model_config": True,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "no_repeat_ngram_size": 3,
        "pad_token_id": 1,
        "transformers_version": "4.32.0.dev0",
        "use_cache": True,
    }
    write_json(path / "generation_config.json", generation_config)

    preprocessor_config = {
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "processor_class": "Kosmos2Processor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 224},
        "use_square_size": True,
    }
    write_json(path / "preprocessor_config.json", preprocessor_config)
    check_hub_layout(
        path, tied=tied, sharded=False,
        files=(
            "config.json",
            "sentencepiece.bpe.model",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
            "preprocessor_config.json",
            "generation_config.json",
        ),
    )
    return path


def load_kosmos2_processor(path: Path):
    """transformers' Kosmos2Processor for a checkpoint dir, with the PIL image processor."""
    return load_processor(path)


def load_kosmos2_oracle(path: Path):
    """(model, processor) from transformers: eager attention, fp32, eval; PIL image processor."""
    from transformers import Kosmos2ForConditionalGeneration

    return load_oracle_model(Kosmos2ForConditionalGeneration, path), load_kosmos2_processor(path)
