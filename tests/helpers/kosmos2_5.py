"""Builder of a tiny random Kosmos-2.5 checkpoint in the Hugging Face Hub layout, and its oracle loaders.

The builder writes the same files as `microsoft/kosmos-2.5`:
config.json, model.safetensors (or shards + index), tokenizer.json, tokenizer_config.json,
preprocessor_config.json (or the transformers-5 processor_config.json), generation_config.json.
Weights come from transformers' own `Kosmos2_5ForConditionalGeneration` (fp32, seeded), so the
oracle and our loader read exactly the same files.

The tokenizer mirrors the real file's id layout (REFERENCE §3): `<s> <pad> </s> <unk>` = 0..3, a
byte-level BPE (here trained on a small built-in corpus) from id 4 on, then `<mask> <ocr> <image>
</image> </chunk> <bbox> </bbox> <md>` and `<x_i>`/`<y_i>` interleaved for i in 0..4095.
"""

from __future__ import annotations

import json
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

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

# The GPT-4 (cl100k_base) pre-tokenization regex: the real vocabulary is cl100k_base shifted by 4.
CL100K_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Added after the BPE vocabulary, in the order of the original code (unilm kosmos2_5/data/utils.py,
# with fairseq's `<mask>` first). `special` is the flag in tokenizer.json: the released model decodes
# generate() output with skip_special_tokens=True to text that starts at `<bbox>` (transformers'
# integration test), so `<image> </image> <ocr> <md>` are special and the box tokens are not.
TASK_TOKENS = [
    ("<mask>", True),
    ("<ocr>", True),
    ("<image>", True),
    ("</image>", True),
    ("</chunk>", True),
    ("<bbox>", False),
    ("</bbox>", False),
    ("<md>", True),
]
NUM_COORD_BINS = 4096

# A few hundred words of our own to train the tiny BPE: prose, receipts, markdown, digits.
_CORPUS = """
Total 50,000 Sub Total 45,455 Rounding 0 Card Payment 50,000 Cash Change Tax (10%) 4,545
The quick brown fox jumps over the lazy dog while the patient reader studies each printed page.
A document may hold tables, headings, lists, footnotes and figures; the model reads them all.
Invoice number 2024-0117, dated 12/03/2024, due in 30 days. Amount: $1,234.56 (USD).
# Introduction
## Methods and results
- **Item one** costs 12.50
- **Item two** costs 7.25
| Name | Qty | Price |
|------|-----|-------|
| Apple | 3 | 1.20 |
1. First, open the file. 2. Then, read every line. 3. Finally, write the answer!
Questions? Answers: yes, no, maybe. "Quoted text" and 'single quotes' are common too.
The assistant gives helpful, detailed, and polite answers to the user's questions.
A chat between a curious user and an artificial intelligence assistant. USER: What is this? ASSISTANT:
What is the total amount on this receipt? How many items were bought? Who signed the letter?
Page 1 of 12 -- Chapter 3: Reading text in images with transformers and vision encoders.
Email: someone@example.com Phone: +1 (555) 010-9999 Address: 42 Main Street, Springfield.
Numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 100 256 1024 2048 4096 3.14159 2.71828 1e-5
Temperature 21.5 C, humidity 40%, wind 12 km/h; forecast: sunny & warm <tomorrow>.
Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt.
Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea.
Signature ____________ Date ___/___/______ [REG] BLACK SAKURA COOKIE DOH SAUCES NATA DE COCO
"""


def _train_bpe(vocab_size: int = 600) -> dict:
    """Train a byte-level BPE on the built-in corpus; return the tokenizer as a JSON dict."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    tok.train_from_iterator(lines * 3, trainer=trainer)
    return json.loads(tok.to_str())


def build_kosmos2_5_tokenizer_json(specials: list[str] | None = None) -> dict:
    """tokenizer.json content with the real Kosmos-2.5 layout (ids of the fairseq specials first).

    `specials` reorders the four fairseq tokens (a test uses it to prove ids are read, not assumed).
    """
    specials = list(specials or FAIRSEQ_SPECIALS)
    trained = _train_bpe()
    bpe_vocab: dict[str, int] = trained["model"]["vocab"]
    # Shift every BPE id by the 4 fairseq specials, as the real file does with cl100k_base.
    vocab = {tok: i for i, tok in enumerate(specials)}
    for tok, idx in sorted(bpe_vocab.items(), key=lambda kv: kv[1]):
        vocab[tok] = idx + len(specials)
    assert len(vocab) == len(specials) + len(bpe_vocab)

    added = [added_token(i, tok, special=True) for i, tok in enumerate(specials)]
    next_id = len(vocab)
    for content, special in TASK_TOKENS:
        added.append(added_token(next_id, content, special=special))
        next_id += 1
    for i in range(NUM_COORD_BINS):
        added.append(added_token(next_id, f"<x_{i}>", special=False))
        added.append(added_token(next_id + 1, f"<y_{i}>", special=False))
        next_id += 2

    model = dict(trained["model"])
    model.update(
        {
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": vocab,
        }
    )
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": trained["pre_tokenizer"],
        # No BOS/EOS template: the processor writes `<s>` itself and no `</s>` is appended.
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": trained["decoder"],
        "model": model,
    }


def build_kosmos2_5_tokenizer_config(tokenizer_json: dict) -> dict:
    """tokenizer_config.json as transformers writes it for this tokenizer (PreTrainedTokenizerFast)."""
    return {
        "added_tokens_decoder": added_tokens_decoder_block(tokenizer_json["added_tokens"]),
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        # Named so that Kosmos2_5Processor finds tokenizer.boi_token / eoi_token / image_token.
        "extra_special_tokens": {"boi_token": "<image>", "eoi_token": "</image>", "image_token": "<s>"},
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "processor_class": "Kosmos2_5Processor",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }


def write_kosmos2_5_tokenizer(path: Path, specials: list[str] | None = None) -> int:
    """Write tokenizer.json + tokenizer_config.json into `path`; return the vocabulary size."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tj = build_kosmos2_5_tokenizer_json(specials)
    write_json(path / "tokenizer.json", tj)
    write_json(path / "tokenizer_config.json", build_kosmos2_5_tokenizer_config(tj))
    return len(tj["model"]["vocab"]) + len(tj["added_tokens"]) - len(FAIRSEQ_SPECIALS)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

TINY_MAX_PATCHES = 256
TINY_LATENT_QUERY_NUM = 16


def _tiny_config(vocab_size: int, *, tied: bool, text_heads: int = 4):
    from transformers import Kosmos2_5Config

    text = tiny_text_config(vocab_size, tied=tied, max_position_embeddings=1024, attention_heads=text_heads)
    vision = dict(
        hidden_size=32,
        patch_embed_hidden_size=768,  # 16*16*3: fixed by the image processor
        intermediate_size=64,
        head_dim=8,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_num_patches=TINY_MAX_PATCHES,
        dropout_rate=0.0,
    )
    return Kosmos2_5Config(
        text_config=text, vision_config=vision, latent_query_num=TINY_LATENT_QUERY_NUM, tie_word_embeddings=tied
    )


def make_kosmos2_5_checkpoint(
    path: Path,
    *,
    tied: bool,
    sharded: bool,
    image_dependent: bool,
    processor_layout: str = "preprocessor",
    seed: int = 0,
    text_heads: int = 4,
) -> Path:
    """Write a tiny random Kosmos-2.5 checkpoint in the Hub layout into `path`; return `path`.

    tied: lm_head shares embed_tokens and is absent from the safetensors (as in the real repo).
    sharded: model-0000K-of-0000N.safetensors + model.safetensors.index.json with N >= 2.
    image_dependent: untie/scale weights so greedy output changes with the image (needs tied=False).
    processor_layout: "preprocessor" (old preprocessor_config.json, like the Hub repo) or
        "processor" (transformers-5 processor_config.json with the image processor nested).
    """
    from transformers import Kosmos2_5ForConditionalGeneration

    if processor_layout not in ("preprocessor", "processor"):
        raise ValueError(f"processor_layout must be 'preprocessor' or 'processor', not {processor_layout!r}")
    check_builder_args(tied=tied, image_dependent=image_dependent)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    vocab_size = write_kosmos2_5_tokenizer(path)
    config = _tiny_config(vocab_size, tied=tied, text_heads=text_heads)
    # The real checkpoint (2 shards of ~5.5 GB) is sharded by size; ours by a tiny limit.
    save_random_model(
        path, Kosmos2_5ForConditionalGeneration, config, seed=seed, image_dependent=image_dependent,
        max_shard_size="1MB" if sharded else "10GB",
    )

    image_processor = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "image_processor_type": "Kosmos2_5ImageProcessor",
        "max_patches": TINY_MAX_PATCHES,
        "patch_size": {"height": 16, "width": 16},
    }
    if processor_layout == "preprocessor":
        processor_file = "preprocessor_config.json"
        write_json(path / processor_file, {**image_processor, "processor_class": "Kosmos2_5Processor"})
    else:
        processor_file = "processor_config.json"
        processor_config = {
            "image_processor": image_processor,
            "num_image_tokens": TINY_LATENT_QUERY_NUM,
            "processor_class": "Kosmos2_5Processor",
        }
        write_json(path / processor_file, processor_config)
    check_hub_layout(
        path, tied=tied, sharded=sharded,
        files=("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", processor_file),
    )
    return path


def load_kosmos2_5_oracle(path: Path, *, num_image_tokens: int | None = None):
    """(model, processor) from transformers: eager attention, fp32, eval; PIL image processor."""
    from transformers import Kosmos2_5ForConditionalGeneration

    model = load_oracle_model(Kosmos2_5ForConditionalGeneration, path)
    return model, load_kosmos2_5_processor(path, num_image_tokens=num_image_tokens)


def load_kosmos2_5_processor(path: Path, *, num_image_tokens: int | None = None):
    """transformers' Kosmos2_5Processor for a checkpoint dir, with the PIL image processor.

    num_image_tokens defaults to the checkpoint's latent_query_num (the processor's own default is
    2048, the released model's value, and the old preprocessor_config.json layout cannot say otherwise).
    """
    path = Path(path)
    if num_image_tokens is None:
        num_image_tokens = json.loads((path / "config.json").read_text())["latent_query_num"]
    processor = load_processor(path, num_image_tokens=num_image_tokens)
    # Kosmos2_5Processor's own default (max_patches=4096: a class attribute in transformers 5.23, a
    # kwargs default in 5.17) beats the image processor's setting; the released checkpoint uses 4096
    # anyway. Passing it with every call wins in both versions, so the tiny one uses its own value.
    processor.__class__ = _own_max_patches(type(processor))
    return processor


def _own_max_patches(cls):
    def __call__(self, *args, **kwargs):
        return cls.__call__(self, *args, **{"max_patches": self.image_processor.max_patches, **kwargs})

    return type(cls.__name__, (cls,), {"__call__": __call__})
