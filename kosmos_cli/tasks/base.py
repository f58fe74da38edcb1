"""`Task`: everything the rest of the program knows about one task, in one record.

Each task module (`ocr`, `markdown`, `grounding`) defines its record as ``TASK``; `kosmos_cli.tasks`
collects them. The pipeline reads the prompt, the budget and `parse`; the writers read `text` and
`documents`; the CLI reads the name and the default model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..confidence import TokenScores
from ..results import PageResult


class WrongModel(ValueError):
    """The model loaded is of another architecture than the task needs: a usage error (exit 2)."""


@dataclass(frozen=True)
class Task:
    name: str  # the command name and the JSONL "task" field
    model_kind: str  # the architecture it needs (an engine's `kind`)
    default_model: str
    prompt: str
    max_new_tokens: int  # the default budget per page
    # (raw model text, model input size, page size, the tokens' `TokenScores` or None) -> the page
    # result's task fields (text, lines, entities; the confidence of each line and entity with scores)
    parse: Callable[[str, tuple[int, int], tuple[int, int], TokenScores | None], dict]
    # A page result as plain text: what stdout shows and what a .txt document holds for the page.
    text: Callable[[PageResult], str]
    documents: tuple[str, ...]  # the document files written under -o by default, by suffix (see writers.formats)
    caption_task: bool = False  # the prompt is the start of the caption (Kosmos-2 grounding)
    aliases: tuple[str, ...] = ()  # other names `find_task` accepts
    optional_documents: tuple[str, ...] = ()  # the document files it writes only when asked (--outputs)

    def check_model(self, kind: str, model: str) -> None:
        """Raise `WrongModel` unless a model of architecture ``kind`` (named ``model``) can run this task."""
        if kind != self.model_kind:
            raise WrongModel(f"`kosmos {self.name}` needs a {self.model_kind} model, but {model} is {kind}")

    @property
    def possible_documents(self) -> tuple[str, ...]:
        """Every document file the task can write: its defaults, then the optional ones."""
        return self.documents + self.optional_documents


def result_text(result: PageResult) -> str:
    """The result's ``text`` field as written out (valid UTF-8)."""
    return result.to_dict()["text"]
