"""``--review-below P``: the pages of a run whose confidence is below P, lowest first, for a person to check.

A page's confidence is the geometric mean of the probabilities of the tokens the model kept
(`kosmos_cli.confidence`): a ranking for review, not a calibrated accuracy. A run lists the pages of its
own inputs (with ``-o``, the pages skipped as done too, read back from their stored records), never
the pages of inputs it was not given; pages of unknown confidence (failed, or stored by a version
before confidence existed) are not listed. Ties are in a stable order: source name (its display
text, by code point), then page number. The command gives the review when a run reaches its end (exit
code 0 or 1); a run stopped by Ctrl-C, a model that cannot load or lost workers leaves the file as it was.

    review = Review(0.8, read_back=out.read_page)   # read_back: with -o, for pages skipped as done
    for item, result in results: review.add(item, result)
    review.tsv()        # "source\tpage\tconfidence\ttruncated" and one row per page listed
    review.message()    # "3 pages below 0.8: a.pdf p4 (0.61), b.png p1 (0.7), a.pdf p2 (0.75)"

Names are `display_path` text (an undecodable byte ``\\xHH``, a backslash ``\\\\``), with a tab, a
newline and a carriage return written ``\\t``, ``\\n`` and ``\\r`` so that a name stays one field of one
line (reversible: every backslash of the name itself is doubled already). Confidences are written as
the records write them (6 significant digits, the JSON number's text).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .pages import PageJob
from .results import PageResult, source_text

__all__ = ["MAX_LISTED", "Entry", "Review", "parse_threshold", "tsv_field"]

MAX_LISTED = 20  # pages named on stderr; the TSV has them all
TSV_HEADER = "source\tpage\tconfidence\ttruncated"


def parse_threshold(value: str) -> float:
    """P of ``--review-below P``: a number from 0 to 1; ValueError otherwise (nan and inf included)."""
    try:
        threshold = float(value)
    except ValueError:
        threshold = math.nan
    if not 0 <= threshold <= 1:  # false for nan
        raise ValueError(f"--review-below must be a number from 0 to 1, not {value!r}")
    return threshold


def tsv_field(text: str) -> str:
    """Display text as one TSV field: tab, newline and carriage return written as ``\\t``, ``\\n``, ``\\r``."""
    return text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


@dataclass(frozen=True)
class Entry:
    """One page listed for review; ``source`` is display text."""

    source: str
    page: int
    confidence: float
    truncated: bool

    @property
    def order(self) -> tuple:
        """Lowest confidence first; ties by source name, then page."""
        return self.confidence, self.source, self.page


class Review:
    """The pages of one run below ``threshold``. ``read_back(stem, page)`` gives the stored record of a
    page the run skipped as done (`OutputDir.read_page`); without it skipped pages are not seen."""

    def __init__(self, threshold: float, read_back: Callable[[str, int], PageResult | None] | None = None):
        self.threshold = threshold
        self.read_back = read_back
        self.unknown = 0  # pages done without a confidence: stored by an older version
        self._entries: dict[tuple[str, int], Entry] = {}

    def add(self, item, result: PageResult | None) -> None:
        """Take one (item, result) pair of the run (failures and notes are passed over)."""
        if not isinstance(item, PageJob):
            return
        if item.skipped and self.read_back is not None:
            result = self.read_back(item.stem, item.page)
        if result is None or result.error is not None:
            return
        if result.confidence is None:
            self.unknown += 1
        elif result.confidence < self.threshold:
            self._entries[item.stem, item.page] = Entry(source_text(item.source), item.page, result.confidence,
                                                        bool(result.truncated))

    def entries(self) -> list[Entry]:
        return sorted(self._entries.values(), key=lambda e: e.order)

    def tsv(self) -> str:
        """The TSV file: a header line, then one row a page, lowest confidence first."""
        rows = [TSV_HEADER] + [f"{tsv_field(e.source)}\t{e.page}\t{e.confidence!r}\t{str(e.truncated).lower()}"
                               for e in self.entries()]
        return "\n".join(rows) + "\n"

    def message(self, tsv: str | None = None, limit: int = MAX_LISTED) -> str:
        """One line for stderr: how many pages are below, the first ``limit`` of them, how many more (and
        ``tsv``, the file's display path, that has them all)."""
        entries = self.entries()
        below = f"below {self.threshold:g}"
        if not entries:
            line = f"no pages {below}"
        else:
            named = ", ".join(f"{tsv_field(e.source)} p{e.page} ({e.confidence!r})" for e in entries[:limit])
            line = f"{len(entries)} page{'s' * (len(entries) != 1)} {below}: {named}"
            if len(entries) > limit:
                line += f", and {len(entries) - limit} more"
        if tsv is not None and entries:
            line += f" (all in {tsv})"
        if self.unknown:
            line += (f"; {self.unknown} page{'s' * (self.unknown != 1)} without a confidence (stored by an older "
                     "version; --overwrite redoes them)")
        return line
