"""Kosmos-2.5 tokenizer and prompt builder, on the `tokenizers` package alone.

The checkpoint's `tokenizer.json` is a byte-level BPE (tiktoken cl100k_base shifted by 4 ids, after
fairseq's `<s> <pad> </s> <unk>`), followed by added tokens: `<mask> <ocr> <image> </image> </chunk>
<bbox> </bbox> <md>` and the coordinate bins `<x_i>`/`<y_i>`. `tokenizer_config.json` names the
special tokens; every id here is read from those two files, never assumed.

A prompt is `<s><image>` + N placeholder tokens + `</image>` + task text, with an image-position mask
`[0, -1] + [1]*N + [-1] + [0]*len(text ids)` (1: an image feature goes here; -1: image delimiters).
"""

from __future__ import annotations

import codecs
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from ..models.loading import ModelLoadError, read_json

OCR_PROMPT = "<ocr>"
MARKDOWN_PROMPT = "<md>"
# kosmos-2.5-chat: markdown mode plus a Vicuna-style system line (model card of microsoft/kosmos-2.5-chat).
CHAT_TEMPLATE = (
    "<md>A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: {question} ASSISTANT:"
)


def chat_prompt(question: str) -> str:
    """Task text for kosmos-2.5-chat asking `question` about the image."""
    return CHAT_TEMPLATE.format(question=question)


# Defaults used when tokenizer_config.json is missing or silent (the values of the released model).
_DEFAULT_NAMES = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "boi_token": "<image>",
    "eoi_token": "</image>",
    "image_token": "<s>",  # the placeholder repeated inside <image>...</image>
}
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def _byte_level_symbols() -> dict[str, int]:
    """Byte-level BPE's alphabet: each byte as a printable character (printable ASCII and Latin-1
    bytes as themselves, the others as the code points from 256 up, in byte order), as a map from
    character to byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}


_BYTE_OF_SYMBOL = _byte_level_symbols()


def _token_content(value) -> str | None:
    """A token named in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _clean_up_spaces(text: str) -> str:
    """transformers' clean_up_tokenization (only used for non-BPE models, as transformers does)."""
    for old, new in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
        (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):
        text = text.replace(old, new)
    return text


class Kosmos25Tokenizer:
    """Tokenizer for Kosmos-2.5: text ↔ ids, and the image+task prompt the model expects.

    Build it with `Kosmos25Tokenizer.from_dir(model_dir)`. Ids and special-token flags come from the
    checkpoint's tokenizer.json and tokenizer_config.json, so results equal transformers'
    `Kosmos2_5Processor` (prompt ids and mask) and `batch_decode(..., skip_special_tokens=True)`.
    """

    def __init__(self, tokenizer: Tokenizer, names: dict[str, str] | None = None, clean_up_spaces: bool = False):
        self._tok = tokenizer
        self._tok.no_truncation()
        self._tok.no_padding()
        names = {**_DEFAULT_NAMES, **(names or {})}
        self.tokens = names  # role -> token string, e.g. {"boi_token": "<image>", ...}

        def lookup(role: str) -> int:
            token = names[role]
            idx = self._tok.token_to_id(token)
            if idx is None:
                raise ValueError(f"tokenizer has no {role} {token!r}")
            return idx

        self.bos_id = lookup("bos_token")
        self.eos_id = lookup("eos_token")
        self.pad_id = lookup("pad_token")
        self.image_start_id = lookup("boi_token")
        self.image_end_id = lookup("eoi_token")
        self.image_placeholder_id = lookup("image_token")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._added = self._tok.get_added_tokens_decoder()  # id -> AddedToken, for `pieces`
        # transformers ignores clean_up_tokenization_spaces for BPE models (it would corrupt them).
        self._clean_up_spaces = clean_up_spaces and type(self._tok.model).__name__ != "BPE"

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Kosmos25Tokenizer":
        """Load from a checkpoint directory holding tokenizer.json (+ tokenizer_config.json)."""
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.exists():
            raise FileNotFoundError(f"{tokenizer_file} not found: a Kosmos-2.5 checkpoint needs tokenizer.json")
        try:
            tok = Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # what the tokenizers package raises for a file it cannot read
            raise ModelLoadError(f"{tokenizer_file} cannot be read as a tokenizer ({err})") from None

        config = read_json(model_dir, "tokenizer_config.json", required=False) or {}
        names = {}
        for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if (content := _token_content(config.get(role))) is not None:
                names[role] = content
        # boi/eoi/image tokens: transformers 5 keeps them in `extra_special_tokens` (a dict);
        # older files may have them at the top level.
        extra = config.get("extra_special_tokens")
        extra = extra if isinstance(extra, dict) else {}
        for role in ("boi_token", "eoi_token", "image_token"):
            content = _token_content(extra.get(role)) or _token_content(config.get(role))
            if content is not None:
                names[role] = content

        _apply_config_added_tokens(tok, config.get("added_tokens_decoder") or {})
        return cls(tok, names, clean_up_spaces=bool(config.get("clean_up_tokenization_spaces", False)))

    # ------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of plain text; added tokens written in it (`<md>`, `<x_3>`…) map to their ids. No BOS/EOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def prompt(self, task_text: str, num_image_tokens: int) -> tuple[list[int], list[int]]:
        """(input ids, image-position mask) for one image and one task text.

        ids  = <s> <image> + placeholder × num_image_tokens + </image> + encode(task_text)
        mask = [0, -1]     + [1] × num_image_tokens          + [-1]     + [0] × len(task ids)
        """
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        head = [self.bos_id, self.image_start_id] + [self.image_placeholder_id] * num_image_tokens
        head.append(self.image_end_id)
        # Tokenize the text after the image span exactly as transformers does (one string), so an
        # added token's lstrip/rstrip at the boundary behaves the same.
        t = self.tokens
        text = t["bos_token"] + t["boi_token"] + t["image_token"] * num_image_tokens + t["eoi_token"] + task_text
        ids = self.encode(text)
        if ids[: len(head)] != head:
            raise ValueError("tokenizer does not map the image span to single tokens; is this a Kosmos-2.5 tokenizer?")
        mask = [0, -1] + [1] * num_image_tokens + [-1] + [0] * (len(ids) - len(head))
        return ids, mask

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` without special tokens (`<s>`, `</s>`, `<pad>`, `<image>`…); box tokens stay as text."""
        text = self._tok.decode(list(ids), skip_special_tokens=True)
        return _clean_up_spaces(text) if self._clean_up_spaces else text

    def pieces(self, ids: list[int]) -> list[str]:
        """The text each id adds to `decode`'s, one string per id: empty for a special token, a
        character completed by this id's bytes belongs to it. With a byte-level BPE (Kosmos-2.5's)
        the pieces join to `decode`'s text, also when a character's bytes span several ids; with
        another decoder each id is decoded alone, which may not."""
        added = self._added
        if type(self._tok.decoder).__name__ != "ByteLevel":
            return ["" if i in added and added[i].special else self._tok.decode([i], skip_special_tokens=True)
                    for i in ids]
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        parts = []
        for i in ids:
            token = added.get(i)
            if token is not None:
                parts.append("" if token.special else utf8.decode(token.content.encode()))
            else:
                symbols = self._tok.id_to_token(i) or ""
                parts.append(utf8.decode(bytes(_BYTE_OF_SYMBOL.get(c, 0x3F) for c in symbols)))
        if parts:
            parts[-1] += utf8.decode(b"", final=True)
        return parts

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._tok.id_to_token(idx)

    def __len__(self) -> int:
        return self.vocab_size


def _apply_config_added_tokens(tok: Tokenizer, decoder: dict) -> None:
    """Re-register added tokens whose flags in tokenizer_config.json differ from tokenizer.json.

    transformers re-adds every `added_tokens_decoder` entry that differs from the backend's own, and
    the backend then takes the config's flags (e.g. `special`, which decides what decode skips).
    """
    current = tok.get_added_tokens_decoder()
    changed = []
    for key, entry in decoder.items():
        if not isinstance(entry, dict) or "content" not in entry:
            continue
        flags = {k: bool(entry[k]) for k in _ADDED_TOKEN_FLAGS if k in entry}
        have = current.get(int(key))
        if have is not None and have.content == entry["content"]:
            if all(getattr(have, k) == v for k, v in flags.items()):
                continue
        elif tok.token_to_id(entry["content"]) not in (None, int(key)):
            continue  # the config disagrees with the file about this id: trust the file
        changed.append(AddedToken(entry["content"], **flags))
    if changed:
        tok.add_tokens(changed)
