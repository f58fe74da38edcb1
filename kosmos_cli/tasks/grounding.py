"""Kosmos-2 grounding: turn generated text into a clean caption plus entities with boxes.

Generated text looks like::

    <image>...</image><grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044>
    <patch_index_0863></object> warming himself by<phrase> a fire</phrase><object><patch_index_0005>
    <patch_index_0911></object>.

and becomes ``"An image of a snowman warming himself by a fire."`` with the entities
``a snowman`` (span 12..21) and ``a fire`` (span 41..47), each with boxes normalised to 0..1.

Rules (identical to transformers' ``Kosmos2Processor.post_process_generation`` on well-formed text):

1. Only the text after the last ``</image>`` counts.
2. The caption is that text with every ``<...>`` tag removed (shortest match, within one line), then
   stripped of surrounding whitespace.
3. An *object* is ``<object>`` followed directly by corner pairs ``<patch_index_A><patch_index_B>``
   separated by ``</delimiter_of_multi_objects/>`` and closed by ``</object>``.  It belongs to the
   phrase ``<phrase>TEXT</phrase>`` that ends right before ``<object>`` (TEXT non-empty, no ``<`` in it).
   The entity is TEXT stripped, its span the character offsets of the stripped TEXT in the caption.
4. An object without such a phrase gives one entity per box, named
   ``<patch_index_A><patch_index_B>`` (indices without zero padding) with an empty span at the place
   of the object -- the reference's naming, kept for parity.
5. Boxes: the image is a 32x32 grid of cells (c = 1/32), index i is cell (i % 32, i // 32).  If the
   two corner cells coincide or share a row or a column, the box covers both cells fully
   ``(ax*c, ay*c, bx*c + c, by*c + c)``; otherwise it joins the cell centres
   ``(ax*c + c/2, ay*c + c/2, bx*c + c/2, by*c + c/2)``.  Corners are kept in the order emitted.

Where the reference gives nothing or nonsense, we give the most useful partial result instead:

6. Truncated or malformed objects (no ``</object>``, because generation stopped or other text/tags
   interrupt the patch indices; an odd number of indices; stray or doubled delimiters) keep every
   complete pair: each delimiter-separated group with at least two indices gives a box from its first
   two indices; leftover single indices are ignored.
7. A corner index outside the grid (>= 1024) invalidates its box (the reference returns coordinates
   beyond 1.0).
8. Spans are clamped into the caption: an object inside the leading (trailing) whitespace gets the
   empty span at the caption's start (end) where the reference gives offsets outside the caption,
   and a phrase of whitespace only gets an empty name and an empty span.
9. Entities never have zero boxes: a phrase whose object yields no valid box is not an entity (its
   text stays in the caption).  Unclosed ``<phrase>`` tags, lone patch indices and other stray tags
   only disappear from the caption.  Nested phrases link the innermost one, as the reference does.

Nothing here raises on any string input.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..confidence import TokenScores
from .base import Task, result_text

__all__ = ["Entity", "parse_grounding", "boxes_to_pixels", "patch_indices_to_box", "GRID_SIZE", "TASK"]

GRID_SIZE = 32  # patches per side of the location grid (1024 location tokens)

_ANY_TAG = re.compile(r"<.*?>")
_PHRASE_OPEN, _PHRASE_CLOSE = "<phrase>", "</phrase>"
_OBJECT_OPEN = "<object>"
# One item inside an object block, matched right where the previous one ended.
_OBJECT_ITEM = re.compile(r"<patch_index_([0-9]+)>|(</delimiter_of_multi_objects/>)|(</object>)")

Box = tuple[float, float, float, float]


@dataclass
class Entity:
    """A grounded phrase: its text, its [start, end) span in the clean caption, its boxes (0..1)."""

    text: str
    span: tuple[int, int]
    boxes: list[Box] = field(default_factory=list)
    # Where it lies in the generated text given to `parse_grounding`: from its <phrase> (its <object>
    # when it has no phrase) to the end of its object block.
    region: tuple[int, int] = field(default=(0, 0), compare=False)


def patch_indices_to_box(first: int, second: int, grid: int = GRID_SIZE) -> Box:
    """Normalised (x0, y0, x1, y1) for a pair of corner cells of the ``grid`` x ``grid`` location grid."""
    cell = 1.0 / grid
    ax, ay = first % grid, first // grid
    bx, by = second % grid, second // grid
    if ax == bx or ay == by:  # also covers first == second
        return (ax * cell, ay * cell, bx * cell + cell, by * cell + cell)
    half = cell / 2
    return (ax * cell + half, ay * cell + half, bx * cell + half, by * cell + half)


def _clean_length(text: str) -> int:
    """Length of ``text`` once its tags are removed (how caption offsets are computed)."""
    return len(_ANY_TAG.sub("", text))


def _read_object(text: str, pos: int) -> tuple[list[list[int]], int]:
    """Delimiter-separated groups of patch indices of the object block starting at ``pos``, and where
    the block ends.

    ``pos`` is just after ``<object>``; the block runs over directly adjacent patch indices and
    delimiters and ends at ``</object>``, at anything else, or at the end of the text.
    """
    groups: list[list[int]] = [[]]
    while True:
        m = _OBJECT_ITEM.match(text, pos)
        if m is None:
            break
        pos = m.end()
        if m.group(1) is not None:
            groups[-1].append(int(m.group(1)))
        elif m.group(2) is not None:
            groups.append([])
        else:
            break
    return groups, pos


def _phrase_before(text: str, pos: int) -> tuple[int, int] | None:
    """Span of TEXT when ``<phrase>TEXT</phrase>`` ends exactly at ``pos`` (TEXT without '<')."""
    if not text.endswith(_PHRASE_CLOSE, 0, pos):
        return None
    end = pos - len(_PHRASE_CLOSE)
    opening = text.rfind("<", 0, end)
    if opening < 0 or not text.startswith(_PHRASE_OPEN, opening):
        return None
    start = opening + len(_PHRASE_OPEN)
    return (start, end) if end > start else None


def parse_grounding(generated_text: str, grid: int = GRID_SIZE) -> tuple[str, list[Entity]]:
    """Clean caption and grounded entities of Kosmos-2 output (rules in the module docstring)."""
    base = generated_text.rfind("</image>") + len("</image>") if "</image>" in generated_text else 0
    text = generated_text[base:]
    raw_caption = _ANY_TAG.sub("", text)
    caption = raw_caption.strip()
    lead = len(raw_caption) - len(raw_caption.lstrip())
    n_cells = grid * grid

    entities: list[Entity] = []
    search_from = 0
    while True:
        start = text.find(_OBJECT_OPEN, search_from)
        if start < 0:
            break
        groups, end = _read_object(text, start + len(_OBJECT_OPEN))
        search_from = start + len(_OBJECT_OPEN)
        pairs = [(g[0], g[1]) for g in groups if len(g) >= 2]
        pairs = [(a, b) for a, b in pairs if a < n_cells and b < n_cells]
        if not pairs:
            continue
        boxes = [patch_indices_to_box(a, b, grid) for a, b in pairs]
        phrase = _phrase_before(text, start)
        if phrase is not None:
            name = text[phrase[0] : phrase[1]]
            s = _clean_length(text[: phrase[0]]) + len(name) - len(name.lstrip()) - lead
            e = _clean_length(text[: phrase[1]]) - (len(name) - len(name.rstrip())) - lead
            s = min(max(s, 0), len(caption))
            region = (base + phrase[0] - len(_PHRASE_OPEN), base + end)
            entities.append(Entity(name.strip(), (s, min(max(e, s), len(caption))), boxes, region))
        else:
            # No phrase: one entity per box, named after its corner indices, empty span.
            s = min(max(_clean_length(text[:start]) - lead, 0), len(caption))
            for (a, b), box in zip(pairs, boxes):
                entities.append(Entity(f"<patch_index_{a}><patch_index_{b}>", (s, s), [box], (base + start, base + end)))
    return caption, entities


def boxes_to_pixels(boxes, width: int, height: int) -> list[list[int]]:
    """Normalised boxes -> integer pixel boxes ``[x0, y0, x1, y1]`` for an image of ``width`` x ``height``.

    Each coordinate is scaled and truncated (``int(x * width)``, as the original Kosmos-2 demo draws
    them), corners are put in order (x0 <= x1, y0 <= y1) and clipped to the image.
    """
    out = []
    for x0, y0, x1, y1 in boxes:
        xs = sorted((int(math.floor(x0 * width)), int(math.floor(x1 * width))))
        ys = sorted((int(math.floor(y0 * height)), int(math.floor(y1 * height))))
        xs = [min(max(v, 0), width) for v in xs]
        ys = [min(max(v, 0), height) for v in ys]
        out.append([xs[0], ys[0], xs[1], ys[1]])
    return out


PROMPT = "<grounding> An image of"


def page_fields(raw: str, model_size: tuple[int, int], page_size: tuple[int, int],
                scores: TokenScores | None = None) -> dict:
    """The page result's fields for raw Kosmos-2 output: caption and entities, boxes normalised
    (``boxes``) and in pixels of the page as given (``pixel_boxes``); with ``scores`` each entity's
    confidence, over the tokens generated from its <phrase> to its </object> (a phrase the prompt
    gave has only its object's)."""
    caption, entities = parse_grounding(raw)
    fields = []
    for e in entities:
        entity = {"text": e.text, "span": list(e.span), "boxes": [list(b) for b in e.boxes],
                  "pixel_boxes": boxes_to_pixels(e.boxes, *page_size)}
        if scores is not None:
            entity["confidence"] = scores.over(*e.region)
        fields.append(entity)
    return {"text": caption, "entities": fields}


# Grounded captions are short; 128 tokens is the Kosmos-2 demo's budget.
TASK = Task("ground", "kosmos-2", "microsoft/kosmos-2-patch14-224", PROMPT, 128, page_fields, result_text,
            documents=(".txt", ".json"), caption_task=True, aliases=("grounding",))
