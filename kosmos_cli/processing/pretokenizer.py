"""What a sentencepiece-converted ``tokenizer.json`` does to text before its model sees it: its
``normalizer`` and its ``pre_tokenizer`` (Metaspace), for the subset of tokenizers' steps such
conversions use. Anything else is refused loudly rather than tokenized differently.

Kosmos-2's tokenizer runs the text between added tokens through it: normalise, then split into
``▁``-prefixed words, each of which the unigram model encodes.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Callable

# Characters with the Unicode White_Space property (what the reference splits words and strips on).
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
WHITESPACE_CHARS = "".join(sorted(_WHITESPACE))
_SPLIT_WS = re.compile("[" + re.escape(WHITESPACE_CHARS) + "]+")
SPIECE_UNDERLINE = "\u2581"

# What the Hub's tokenizer.json declares (the 2023 sentencepiece conversion of XLM-RoBERTa), used when a
# checkpoint has no tokenizer.json.
DEFAULT_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Precompiled"},
        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
    ],
}
DEFAULT_PRE_TOKENIZER = {"type": "Metaspace", "replacement": SPIECE_UNDERLINE, "prepend_scheme": "always", "split": True}


class PreTokenizer:
    """``normalize`` and ``words`` as the ``tokenizer.json`` sections ``normalizer`` and
    ``pre_tokenizer`` say; ``charmap`` is the sentencepiece model's own character map (the
    "Precompiled" normaliser)."""

    def __init__(self, normalizer: dict, pre_tokenizer: dict, charmap: Callable[[str], str]):
        self._steps = _normalizer_steps(normalizer, charmap)
        self._whitespace_split, self._metaspace_split = _pre_tokenizer_splits(pre_tokenizer)

    def normalize(self, text: str) -> str:
        for step in self._steps:
            text = step(text)
        return text

    def words(self, text: str) -> list[str]:
        """Normalised text -> '▁'-prefixed words (tokenizers' Metaspace with prepend_scheme 'always')."""
        chunks = [w for w in _SPLIT_WS.split(text) if w] if self._whitespace_split else [text]
        words: list[str] = []
        for chunk in chunks:
            if not chunk:
                continue
            chunk = chunk.replace(" ", SPIECE_UNDERLINE)
            if not chunk.startswith(SPIECE_UNDERLINE):
                chunk = SPIECE_UNDERLINE + chunk
            if not self._metaspace_split:
                words.append(chunk)
                continue
            # Split before every ▁, each ▁ staying with what follows it.
            starts = [i for i, c in enumerate(chunk) if c == SPIECE_UNDERLINE] + [len(chunk)]
            words.extend(chunk[a:b] for a, b in zip(starts, starts[1:]))
        return words


def _normalizer_steps(spec: dict, charmap: Callable[[str], str]) -> list[Callable[[str], str]]:
    kind = spec.get("type")
    if kind == "Sequence":
        return [step for sub in spec.get("normalizers", []) for step in _normalizer_steps(sub, charmap)]
    if kind == "Precompiled":
        return [charmap]
    if kind == "Replace":
        pattern = spec["pattern"]
        regex = re.compile(pattern["Regex"]) if "Regex" in pattern else re.compile(re.escape(pattern["String"]))
        content = spec["content"]
        return [lambda t, r=regex, c=content: r.sub(lambda _m: c, t)]
    if kind == "Strip":
        left, right = spec.get("strip_left", spec.get("left", True)), spec.get("strip_right", spec.get("right", True))
        def strip(t, left=left, right=right):
            if left:
                t = t.lstrip(WHITESPACE_CHARS)
            if right:
                t = t.rstrip(WHITESPACE_CHARS)
            return t
        return [strip]
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return [lambda t, form=kind: unicodedata.normalize(form, t)]
    raise NotImplementedError(f"tokenizer.json normalizer {kind!r} is not supported")


def _pre_tokenizer_splits(spec: dict) -> tuple[bool, bool]:
    """(split on whitespace first?, split before each ▁?) for Metaspace-style pre-tokenizers."""
    steps = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    kinds = [step.get("type") for step in steps]
    whitespace_split = kinds[:-1] == ["WhitespaceSplit"]
    meta = steps[-1] if steps else {}
    if meta.get("type") != "Metaspace" or kinds[:-1] not in ([], ["WhitespaceSplit"]):
        raise NotImplementedError(f"tokenizer.json pre_tokenizer {kinds} is not supported")
    scheme = meta.get("prepend_scheme", "always" if meta.get("add_prefix_space", True) else "never")
    if scheme != "always" or meta.get("replacement", SPIECE_UNDERLINE) != SPIECE_UNDERLINE:
        raise NotImplementedError(f"Metaspace with prepend_scheme={scheme!r} is not supported")
    return whitespace_split, bool(meta.get("split", True))
