"""Kosmos-2.5 markdown: the ``<md>`` prompt and the cleanup of its output.

Cleanup follows the reference post-processing: drop a leading ``<md>`` echo (and stray ``<s>``/
``</s>``/``<pad>``), turn ``<br>`` (any case, ``<br/>``, ``<br />``) into newlines, strip every line,
collapse 3+ newlines into 2, and strip the result. Stripping lines loses markdown indentation, as the
original code does; Kosmos-2.5 does not emit nested indentation in practice.
"""

from __future__ import annotations

import re

from .base import Task, result_text

PROMPT = "<md>"

_LEADING = re.compile(r"\A(?:\s|<s>|<md>)*")
_SPECIAL = re.compile(r"</s>|<s>|<pad>")
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def clean_markdown(raw: str) -> str:
    """Clean raw ``<md>`` output into markdown text."""
    text = _LEADING.sub("", raw)
    text = _SPECIAL.sub("", text)
    text = _BR.sub("\n", text)
    text = "\n".join(line.strip() for line in text.splitlines())
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def page_fields(raw: str, model_size: tuple[int, int], page_size: tuple[int, int], scores=None) -> dict:
    """The page result's fields for raw ``<md>`` output (a markdown page's confidence is the page's only)."""
    return {"text": clean_markdown(raw)}


# The budget of `ocr`, which fits a full page.
TASK = Task("md", "kosmos-2.5", "microsoft/kosmos-2.5", PROMPT, 3072, page_fields, result_text,
            documents=(".md",), aliases=("markdown",))
