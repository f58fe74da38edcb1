"""Kosmos-2 tokenizer and prompt builder (sentencepiece, fairseq id layout).

The released checkpoint (microsoft/kosmos-2-patch14-224) ships an XLM-RoBERTa style sentencepiece
unigram model, ``sentencepiece.bpe.model`` (the name says "bpe", the model is a unigram one), plus the
Kosmos-2 tag tokens.  Ids follow fairseq:

    <s>=0  <pad>=1  </s>=2  <unk>=3   sentencepiece piece p (p >= 3) -> p + 1   <mask> = last base id
    then the added tokens </doc> <image> </image> </chunk> </line> <phrase> </phrase> <object> </object>
    </delimiter_of_multi_objects/> <grounding> <patch_index_0000> ... <patch_index_1023>

Sentencepiece's own <unk>/<s>/</s> (its ids 0, 1, 2) are not reused: its unk maps to 3.

Behaviour mirrored from the reference pipeline (transformers 5.x loads the tokenizer of model type
``kosmos-2`` as a plain ``TokenizersBackend`` over ``tokenizer.json``, then ``Kosmos2Processor``
re-registers the tag tokens):

* Added tokens are split out of the raw text first.  The Kosmos-2 tags and patch indices always strip
  the whitespace on their left (the processor registers them with ``lstrip=True``); special tokens take
  their ``lstrip``/``rstrip`` flags from the files (``<mask>`` strips left in the released files).
* Each remaining piece of text goes through the normaliser and pre-tokenizer declared in
  ``tokenizer.json`` (``pretokenizer.py``; the reference loads that file as is for model type
  ``kosmos-2``).  For the released files that is: the model's own character map (NFKC-like, the
  sentencepiece ``precompiled_charsmap``), runs of spaces collapsed to one, spaces turned into ``▁``,
  a ``▁`` prepended, and a split before every ``▁``.  Every resulting ``▁word`` is encoded with the unigram
  model.  So a leading space is absorbed, but a trailing space becomes a lone ``▁`` token.
* Decoding drops special tokens (if asked), keeps tag tokens verbatim, turns ``▁`` into spaces, drops the
  one leading space of the first token and, when ``clean_up_tokenization_spaces`` is set in
  ``tokenizer_config.json`` (it is in the released files), applies the classic " ." -> "." clean-up.
"""

from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm

from ..models.loading import read_json
from .pretokenizer import DEFAULT_NORMALIZER, DEFAULT_PRE_TOKENIZER, SPIECE_UNDERLINE, WHITESPACE_CHARS, PreTokenizer

__all__ = ["Kosmos2Tokenizer", "TAG_TOKENS", "NUM_PATCH_INDEX_TOKENS", "patch_index_token"]

# Kosmos-2 structural tags, in the order the reference processor registers them.
TAG_TOKENS = (
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
)
NUM_PATCH_INDEX_TOKENS = 1024

# The fairseq layout of the first four ids (fixed by the model, checked against the files if present).
_FAIRSEQ_SPECIALS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}


def patch_index_token(i: int) -> str:
    return f"<patch_index_{i:04d}>"


def _token_content(value, default: str) -> str:
    """A special token entry may be a plain string or an AddedToken-like dict."""
    if isinstance(value, dict):
        return str(value.get("content", default))
    if isinstance(value, str):
        return value
    return default


class _Added:
    """An added (non-sentencepiece) token: its id and how it is matched/decoded."""

    __slots__ = ("content", "id", "lstrip", "rstrip", "special", "normalized")

    def __init__(self, content: str, id_: int, lstrip: bool, rstrip: bool, special: bool, normalized: bool):
        self.content, self.id, self.lstrip, self.rstrip = content, id_, lstrip, rstrip
        self.special, self.normalized = special, normalized


class Kosmos2Tokenizer:
    """Kosmos-2 text tokenizer: ``encode``, ``decode`` and the image prompt ``prompt``.

    Attributes: ``bos_id``, ``eos_id``, ``pad_id``, ``unk_id``, ``mask_id``, ``image_start_id``
    (``<image>``), ``image_end_id`` (``</image>``), ``vocab_size`` (number of ids including every added
    token, i.e. the size of the model's embedding table: 65037 for the released model) and
    ``base_vocab_size`` (ids up to and including ``<mask>``).
    """

    def __init__(
        self,
        sp_model_path: str | Path,
        added_tokens: dict[str, dict] | None = None,
        *,
        special_names: dict[str, str] | None = None,
        clean_up_tokenization_spaces: bool = False,
        normalizer: dict | None = None,
        pre_tokenizer: dict | None = None,
    ):
        """Tokenizer over a sentencepiece model file.

        ``added_tokens`` maps token text -> {"id", "lstrip", "rstrip", "special", "normalized"} as read
        from the files;
        ``normalizer`` / ``pre_tokenizer`` are the ``tokenizer.json`` sections of the same name
        (defaults: those of the released checkpoint).
        """
        self._sp = spm.SentencePieceProcessor(model_file=str(sp_model_path))
        # The model's character map alone: no dummy prefix, no whitespace handling.
        self._charmap = spm.SentencePieceNormalizer(
            model_file=str(sp_model_path),
            add_dummy_prefix=False,
            escape_whitespaces=False,
            remove_extra_whitespaces=False,
        )
        self._pretokenizer = PreTokenizer(
            normalizer or DEFAULT_NORMALIZER, pre_tokenizer or DEFAULT_PRE_TOKENIZER, self._charmap.normalize
        )
        # sentencepiece id of a lone "▁" (its unk id if the model has no such piece).
        self._sp_underline = self._sp.piece_to_id(SPIECE_UNDERLINE)
        n_pieces = self._sp.get_piece_size()
        names = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}
        names.update(special_names or {})
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)

        # Base vocabulary: 4 fairseq specials, sentencepiece pieces 3.. shifted by one, then <mask>.
        self._sp_unk = self._sp.unk_id()
        self.base_vocab_size = n_pieces + 2
        default_ids = {
            names["bos"]: 0,
            names["pad"]: 1,
            names["eos"]: 2,
            names["unk"]: 3,
            names["mask"]: n_pieces + 1,
        }
        files = dict(added_tokens or {})

        def flags(info: dict, content: str, special: bool) -> _Added:
            # <mask> strips left and is matched on normalised text in the released files; the other
            # specials are matched verbatim.
            is_mask = content == names["mask"]
            return _Added(
                content,
                int(info["id"]),
                bool(info.get("lstrip", is_mask)),
                bool(info.get("rstrip", False)),
                special,
                bool(info.get("normalized", is_mask and special)),
            )

        self._added: dict[str, _Added] = {}
        for content, default_id in default_ids.items():
            self._added[content] = flags({"id": default_id, **files.get(content, {})}, content, True)
        # Any other special token the files declare (none in the released model) keeps its flags.
        for content, info in files.items():
            if content not in self._added and info.get("special") and content not in TAG_TOKENS:
                self._added[content] = flags(info, content, True)

        # Kosmos-2 tags: ids from the files; missing ones are appended in registration order, as the
        # reference processor does.  The processor (re-)registers all of them with lstrip=True,
        # rstrip=False, normalized=False, which overrides those flags in the files; the `special` flag
        # (whether decode(skip_special_tokens=True) drops them) stays as the files say: not special in
        # the released files, so decoded text keeps the tags.
        next_id = 1 + max(
            [self.base_vocab_size - 1] + [a.id for a in self._added.values()] + [int(i["id"]) for i in files.values() if "id" in i]
        )
        tags = list(TAG_TOKENS) + [patch_index_token(i) for i in range(NUM_PATCH_INDEX_TOKENS)]
        for content in tags:
            if content in files:
                id_ = int(files[content]["id"])
            else:
                id_, next_id = next_id, next_id + 1
            special = bool(files.get(content, {}).get("special", False))
            self._added[content] = _Added(content, id_, True, False, special, False)
        # Plain (non-special, non-tag) added tokens from the files, if any.
        for content, info in files.items():
            if content not in self._added:
                self._added[content] = flags(info, content, False)

        self._by_id: dict[int, _Added] = {a.id: a for a in self._added.values()}
        # Two passes, as in tokenizers: tokens matched on the raw text, then (inside the remaining
        # text, once normalised) tokens flagged `normalized`.  Leftmost match; the longest token
        # first among those starting at the same place.
        self._raw_re = self._alternation([t for t, a in self._added.items() if not a.normalized])
        self._normalized_re = self._alternation([t for t, a in self._added.items() if a.normalized])

        self.bos_id = self._added[names["bos"]].id
        self.pad_id = self._added[names["pad"]].id
        self.eos_id = self._added[names["eos"]].id
        self.unk_id = self._added[names["unk"]].id
        self.mask_id = self._added[names["mask"]].id
        self.image_start_id = self._added["<image>"].id
        self.image_end_id = self._added["</image>"].id
        self.vocab_size = max(self.base_vocab_size, max(self._by_id) + 1)
        self.special_ids = frozenset(a.id for a in self._added.values() if a.special)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Kosmos2Tokenizer":
        """Build from a checkpoint directory holding ``sentencepiece.bpe.model`` and the token files.

        Added-token ids and flags come from (later wins): ``added_tokens.json`` (ids only),
        ``tokenizer.json`` (``added_tokens``), ``tokenizer_config.json`` (``added_tokens_decoder``).
        Special-token names come from ``special_tokens_map.json`` / ``tokenizer_config.json``.
        """
        model_dir = Path(model_dir)
        sp_path = model_dir / "sentencepiece.bpe.model"
        if not sp_path.is_file():
            raise FileNotFoundError(f"{sp_path} not found (Kosmos-2 needs its sentencepiece model)")
        config = read_json(model_dir, "tokenizer_config.json", required=False) or {}
        special_map = read_json(model_dir, "special_tokens_map.json", required=False) or {}

        names = {}
        for key in ("bos", "eos", "pad", "unk", "mask"):
            value = config.get(f"{key}_token", special_map.get(f"{key}_token"))
            if value is not None:
                names[key] = _token_content(value, "")

        added: dict[str, dict] = {}
        legacy = read_json(model_dir, "added_tokens.json", required=False) or {}
        for content, id_ in legacy.items():
            added[content] = {"id": int(id_)}
        # Flags given for the special tokens in special_tokens_map.json (e.g. <mask> lstrip).
        for key in ("bos", "eos", "pad", "unk", "mask"):
            value = special_map.get(f"{key}_token")
            if isinstance(value, dict) and "content" in value:
                entry = added.setdefault(value["content"], {})
                entry.update({k: value[k] for k in ("lstrip", "rstrip", "normalized") if k in value}, special=True)
        tok_json = read_json(model_dir, "tokenizer.json", required=False) or {}
        for tok in tok_json.get("added_tokens", []):
            added.setdefault(tok["content"], {}).update(
                id=int(tok["id"]),
                lstrip=bool(tok.get("lstrip", False)),
                rstrip=bool(tok.get("rstrip", False)),
                special=bool(tok.get("special", False)),
                normalized=bool(tok.get("normalized", False)),
            )
        for id_, tok in (config.get("added_tokens_decoder") or {}).items():
            added.setdefault(tok["content"], {}).update(
                id=int(id_),
                lstrip=bool(tok.get("lstrip", False)),
                rstrip=bool(tok.get("rstrip", False)),
                special=bool(tok.get("special", False)),
                normalized=bool(tok.get("normalized", False)),
            )
        # The special tokens' ids may be given nowhere explicitly: fall back to the fairseq layout.
        added = {k: v for k, v in added.items() if "id" in v or k in _FAIRSEQ_SPECIALS or k in names.values()}
        return cls(
            sp_path,
            added,
            special_names=names,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            normalizer=tok_json.get("normalizer"),
            pre_tokenizer=tok_json.get("pre_tokenizer"),
        )

    # ------------------------------------------------------------------ encoding
    def token_to_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token].id
        p = self._sp.piece_to_id(token)
        if p == self._sp_unk and token != self._sp.id_to_piece(p):
            return None
        return self._piece_to_fairseq(p)

    def id_to_token(self, id_: int) -> str:
        if id_ in self._by_id:
            return self._by_id[id_].content
        p = id_ - 1
        if 3 <= p < self._sp.get_piece_size():
            return self._sp.id_to_piece(p)
        raise KeyError(f"token id {id_} out of range")

    def _piece_to_fairseq(self, p: int) -> int:
        return self.unk_id if p == self._sp_unk else p + 1

    @staticmethod
    def _alternation(tokens: list[str]):
        if not tokens:
            return None
        return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))

    def _split_added(self, text: str, pattern, encode_rest) -> list[int]:
        """Ids of ``text``: tokens found by ``pattern`` (with their lstrip/rstrip), the rest via ``encode_rest``."""
        if pattern is None:
            return encode_rest(text)
        ids: list[int] = []
        pos = 0
        pending_rstrip = False
        for m in pattern.finditer(text):
            tok = self._added[m.group(0)]
            chunk = text[pos : m.start()]
            if pending_rstrip:
                chunk = chunk.lstrip(WHITESPACE_CHARS)
            if tok.lstrip:
                chunk = chunk.rstrip(WHITESPACE_CHARS)
            ids.extend(encode_rest(chunk))
            ids.append(tok.id)
            pos = m.end()
            pending_rstrip = tok.rstrip
        chunk = text[pos:]
        if pending_rstrip:
            chunk = chunk.lstrip(WHITESPACE_CHARS)
        ids.extend(encode_rest(chunk))
        return ids

    def _encode_raw_chunk(self, text: str) -> list[int]:
        """Text between raw-matched added tokens: normalise, then split out normalised added tokens."""
        if not text:
            return []
        text = self._pretokenizer.normalize(text)
        return self._split_added(text, self._normalized_re, self._encode_normalized)

    def _encode_normalized(self, text: str) -> list[int]:
        """Normalised text without added tokens -> ids: pre-tokenize, unigram-encode each word."""
        words = self._pretokenizer.words(text) if text else []
        ids: list[int] = []
        # sentencepiece re-applies its (idempotent) character map and adds the ▁ back itself.
        encoded = iter(self._sp.encode([w.replace(SPIECE_UNDERLINE, " ") for w in words if w != SPIECE_UNDERLINE]))
        for w in words:
            if w == SPIECE_UNDERLINE:  # a lone ▁ (e.g. from a trailing space): that piece, or <unk>
                ids.append(self._piece_to_fairseq(self._sp_underline))
            else:
                ids.extend(self._piece_to_fairseq(p) for p in next(encoded))
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no <s>/</s> added.  Added tokens in the text become their ids."""
        return self._split_added(text, self._raw_re, self._encode_raw_chunk)

    def image_placeholder_ids(self, num_image_tokens: int = 64) -> list[int]:
        """Ids filling the image slots: the ids right after <unk> (4..67 for 64 slots)."""
        first = self.unk_id + 1
        return list(range(first, first + num_image_tokens))

    def prompt(self, text: str, num_image_tokens: int = 64) -> tuple[list[int], list[int]]:
        """Prompt ids and image-position mask for one image and ``text`` (no EOS appended).

        Layout: ``<s> <image> [num_image_tokens placeholder ids] </image>`` + encode(text.strip()).
        The mask is 1 on the placeholder positions (2 .. num_image_tokens+1), 0 elsewhere.
        """
        head = [self.bos_id, self.image_start_id] + self.image_placeholder_ids(num_image_tokens)
        head.append(self.image_end_id)
        # The reference joins "<image> ... </image> " + stripped text; the tags strip the space.
        ids = head + self.encode(" " + text.strip())
        mask = [0, 0] + [1] * num_image_tokens + [0] * (len(ids) - num_image_tokens - 2)
        return ids, mask

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text.  Tag and patch-index tokens are kept as text; special ones dropped if asked."""
        text = "".join(self.pieces(ids, skip_special_tokens))
        if self.clean_up_tokenization_spaces:
            text = _clean_up_spaces(text)
        return text

    def pieces(self, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
        """The text each id adds, one string per id (empty for a special token dropped or an unknown
        id), before the clean-up of spaces: joined, they are `decode`'s text before that clean-up."""
        parts: list[str] = []
        for i in ids:
            i = int(i)
            added = self._by_id.get(i)
            p = i - 1
            if skip_special_tokens and i in self.special_ids:
                parts.append("")
            elif added is not None:
                parts.append(added.content)
            elif 3 <= p < self._sp.get_piece_size():
                parts.append(self._sp.id_to_piece(p).replace(SPIECE_UNDERLINE, " "))
            else:
                parts.append("")  # unknown id: nothing to show (the reference drops it as well)
        first = next((k for k, part in enumerate(parts) if part), None)
        if first is not None and parts[first].startswith(" "):
            parts[first] = parts[first][1:]
        return parts


def _clean_up_spaces(text: str) -> str:
    """The classic clean-up of spaces before punctuation and English contractions."""
    for old, new in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(old, new)
    return text
