"""How sure the model was: the probabilities of the tokens it chose, per page and per part of a page.

A page's tokens are the ids its output keeps (`Output.ids`) plus the EOS when it stopped on one, each
with its log-probability under the softmax of the raw logits (`Output.logprobs`). A confidence is the
geometric mean of the probabilities of a set of those tokens, exp(mean log-probability), rounded to 6
significant digits (a random checkpoint gives values near 1e-4, which a fixed number of decimals would
flatten to 0).

Parts of a page (an OCR line, a word, a grounded entity) are spans of characters of the page's raw
text; a token belongs to the part its first character falls in (a byte-level token that holds a
line's newline and the next line's first bytes belongs to the line it starts in). Tokens that decode
to nothing (special tokens) sit at the place they were generated. The EOS has no text: it counts for
the page only, as do tokens outside every part (text the parser drops).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence

__all__ = ["TokenScores", "align", "rounded"]


def rounded(probability: float) -> float:
    """6 significant digits."""
    return float(f"{probability:.6g}")


def align(pieces: Sequence[str], text: str) -> list[int] | None:
    """Where each piece starts in ``text``, the decoded string those pieces make once the decoder has
    tidied it (a leading space stripped, spaces before punctuation removed): ``text`` must be the
    concatenation of the pieces with some characters deleted, else None (the parts of such a page get
    no confidence of their own). A piece whose characters were all deleted starts where the next
    character would."""
    starts: list[int] = []
    j = 0
    for piece in pieces:
        starts.append(j)
        for char in piece:
            if j < len(text) and text[j] == char:
                j += 1
    return starts if j == len(text) else None


class TokenScores:
    """The log-probabilities of a page's kept tokens and where each token starts in the page's raw
    text, to score the page and any span of that text.

    ``starts``: the character offset of each kept id in the raw text (non-decreasing), or None when
    the offsets are unknown (then only the page is scored). ``logprobs``: one per kept id, plus the
    EOS's when the output stopped on one (it has no offset)."""

    def __init__(self, starts: Sequence[int] | None, logprobs: Sequence[float]):
        self.starts = list(starts) if starts is not None else None
        self.logprobs = list(logprobs)
        if self.starts is not None and len(self.starts) > len(self.logprobs):
            raise ValueError(f"{len(self.starts)} token offsets for {len(self.logprobs)} log-probabilities")
        self._sums = list(itertools.accumulate(self.logprobs, initial=0.0))

    @property
    def page(self) -> float | None:
        """Every kept token, the EOS included; None when there are none."""
        return self._mean(0, len(self.logprobs))

    def over(self, start: int, end: int) -> float | None:
        """The tokens that start in the characters [start, end) of the raw text; None when there are
        none or the offsets are unknown."""
        if self.starts is None:
            return None
        return self._mean(bisect.bisect_left(self.starts, start), bisect.bisect_left(self.starts, end))

    def _mean(self, first: int, stop: int) -> float | None:
        if stop <= first:
            return None
        return rounded(math.exp((self._sums[stop] - self._sums[first]) / (stop - first)))
