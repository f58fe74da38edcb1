"""Detect a generation that has fallen into a loop, so decoding can stop early.

A loop is an exact repetition at the tail: the last ``span`` tokens have period ``p``
(``ids[i] == ids[i - p]``), with ``p <= max_period`` and ``span >= max(min_tokens, min_repeats * p)``.

Why these defaults cannot fire on legitimate pages:
- OCR lines start with their own ``<bbox><x_..><y_..>...`` tokens, so a column of ``0`` lines or of
  identical words repeats its text but never the exact token sequence (the y coordinates differ);
- legitimate exact repetition (a row of dots or underscores, a run of empty markdown table rows
  ``| | | |``) stays far below ``min_tokens`` = 256 tokens: ~40 identical 6-token table rows in a row;
- long periods must repeat ``min_repeats`` = 4 times (a 150-token paragraph generated 4 times over).
Loops that are not exact (e.g. the same line with increasing y) are not detected; max_new_tokens
stays the backstop.

Cost: the Z-function of the reversed tail (the last ``max(min_tokens, min_repeats * max_period)`` =
800 tokens by default) gives, for every period at once, how far back the tail repeats: O(tail) per
call, ~0.5 ms in pure Python, independent of the sequence length. Call it every few decode steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_PERIOD = 200
MIN_REPEATS = 4
MIN_TOKENS = 256
WINDOW = max(MIN_TOKENS, MIN_REPEATS * MAX_PERIOD)  # trailing ids the default check looks at


@dataclass(frozen=True)
class Loop:
    """A repetition at the tail of ``ids``: ``ids[start:]`` has period ``period`` and spans ``length`` tokens."""

    period: int
    start: int
    length: int

    @property
    def repeats(self) -> float:
        return self.length / self.period

    @property
    def keep(self) -> int:
        """Tokens to keep to drop the repetition: everything before the loop plus one period."""
        return self.start + self.period


def _z_function(s: Sequence[int]) -> list[int]:
    """z[i] = length of the longest common prefix of s and s[i:] (z[0] = len(s))."""
    n = len(s)
    z = [0] * n
    if n:
        z[0] = n
    left = right = 0
    for i in range(1, n):
        k = min(right - i, z[i - left]) if i < right else 0
        while i + k < n and s[k] == s[i + k]:
            k += 1
        z[i] = k
        if i + k > right:
            left, right = i, i + k
    return z


def find_loop(
    token_ids: Sequence[int],
    *,
    max_period: int = MAX_PERIOD,
    min_repeats: int = MIN_REPEATS,
    min_tokens: int = MIN_TOKENS,
) -> Loop | None:
    """The shortest-period loop at the tail of ``token_ids``, or None (see the module docstring)."""
    if max_period < 1 or min_repeats < 2:
        raise ValueError("need max_period >= 1 and min_repeats >= 2")
    window = max(min_tokens, min_repeats * max_period)
    n = len(token_ids)
    if n < max(min_tokens, 2):
        return None
    tail = list(token_ids[-window:])
    tail.reverse()
    z = _z_function(tail)
    for p in range(1, min(max_period, len(tail) - 1) + 1):
        span = p + z[p]  # the last `span` tokens have period p
        if span >= max(min_tokens, min_repeats * p):
            # Extend past the window (once, when a loop is found) to report where it starts.
            start = n - span
            while start > 0 and token_ids[start - 1] == token_ids[start - 1 + p]:
                start -= 1
            return Loop(period=p, start=start, length=n - start)
    return None


def may_loop(tails: torch.Tensor, *, max_period: int = MAX_PERIOD, min_tokens: int = MIN_TOKENS) -> torch.Tensor:
    """tails (A, W) token ids, each row's last W new ids (W >= min_tokens; rows with fewer new ids
    hold other ids before them) -> (A,) bool, on the tails' device with no host sync: False where
    `find_loop` cannot find a loop. A loop of period p spans at least min_tokens ids, so the last
    min_tokens ids must already repeat with period p: checked for every p at once."""
    last = tails[:, -min_tokens:]  # (A, L)
    i = torch.arange(min_tokens, device=tails.device)
    p = torch.arange(1, min(max_period, min_tokens - 1) + 1, device=tails.device)[:, None]  # (P, 1)
    earlier = last[:, (i - p).clamp_min(0)]  # (A, P, L): the id p positions before each
    repeats = (earlier == last[:, None, :]) | (i < p)  # positions with nothing p before them pass
    return repeats.all(-1).any(-1)
