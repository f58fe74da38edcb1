"""`PageResult`: one page's result, the JSONL schema of DESIGN.md (also the state files under -o)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .paths import display_path

__all__ = ["PageResult", "source_text", "valid_utf8"]


def valid_utf8(text: str) -> str:
    """``text`` with any lone surrogate written out as ``\\udcXX``, so that it encodes as UTF-8.

    For messages and model text, where nothing needs to be undone; paths go through `display_path`."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def source_text(source: str | os.PathLike) -> str:
    """A result's source as display text, `display_path` applied exactly once.

    A path object (or bytes) is a file-system name: it is displayed. A str is display text already,
    unless it holds surrogate escapes, which display text never does: then it is a raw name too."""
    if isinstance(source, str):
        try:
            source.encode("utf-8")
            return source
        except UnicodeEncodeError:
            pass
    return display_path(source)


def _plain(obj: Any) -> Any:
    """Lines/entities as given by the tasks (dataclasses, tuples, dicts) → JSON-ready values, every
    string valid UTF-8."""
    if isinstance(obj, str):
        return valid_utf8(obj)
    if hasattr(obj, "to_dict"):
        return _plain(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return display_path(obj)
    return obj


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_probability(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def _is_line(value: Any) -> bool:
    """``{"text": str, "polygon": [numbers]}``, what the OCR text format needs."""
    return (isinstance(value, dict) and isinstance(value.get("text"), str) and isinstance(value.get("polygon"), list)
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value["polygon"]))


# The schema's fields and the JSON types they must have (checked when a page is read back).
_FIELD_CHECKS: dict[str, Callable[[Any], bool]] = {
    "source": lambda v: isinstance(v, str),
    "page": _is_int,
    "task": lambda v: isinstance(v, str),
    "model": lambda v: isinstance(v, str),
    "width": _is_int,
    "height": _is_int,
    "text": lambda v: isinstance(v, str),
    "confidence": lambda v: v is None or _is_probability(v),
    "new_tokens": lambda v: v is None or _is_int(v),
    "lines": lambda v: isinstance(v, list) and all(_is_line(ln) for ln in v),
    "entities": lambda v: isinstance(v, list) and all(isinstance(e, dict) for e in v),
    "raw": lambda v: isinstance(v, str),
    "truncated": lambda v: isinstance(v, bool),
    "error": lambda v: v is None or isinstance(v, str),
}
_REQUIRED = ("source", "page", "task", "model")


@dataclass
class PageResult:
    """One page's result; `to_json` is one line of ``--format jsonl`` (field order as documented).

    ``source`` is always display text (valid UTF-8, see `display_path`): give a path object
    (``Path``, ``os.PathLike``, bytes) for a file-system name, and it is displayed once here; a str
    is taken as display text already (one that still holds surrogate escapes, which display text
    cannot, is displayed too). Text read back from JSON is a str, so it is never escaped twice.
    ``lines`` are ``{"text", "polygon"}`` (or `Line` objects), ``entities`` are ``{"text", "span",
    "boxes", ...}`` (or objects with ``to_dict``); ``width``/``height`` are the rendered page size.
    ``confidence`` (page, and each line's and entity's) is the geometric mean of the probabilities of
    the tokens kept (`kosmos_cli.confidence`), ``new_tokens`` how many there are (EOS included); both
    None where unknown (a failed page, or a page stored before they existed).
    """

    source: str
    page: int
    task: str
    model: str
    width: int = 0
    height: int = 0
    text: str = ""
    lines: list = field(default_factory=list)
    entities: list = field(default_factory=list)
    raw: str = ""
    truncated: bool = False
    error: str | None = None
    confidence: float | None = None  # last, for positional callers; to_dict puts it after text
    new_tokens: int | None = None

    def __post_init__(self):
        self.source = source_text(self.source)

    def to_dict(self) -> dict:
        """The schema's fields in order; every string valid UTF-8."""
        return _plain({
            "source": source_text(self.source),
            "page": int(self.page),
            "task": self.task,
            "model": self.model,
            "width": int(self.width),
            "height": int(self.height),
            "text": self.text,
            "confidence": self.confidence,
            "new_tokens": self.new_tokens,
            "lines": list(self.lines),
            "entities": list(self.entities),
            "raw": self.raw,
            "truncated": bool(self.truncated),
            "error": self.error,
        })

    def to_json(self) -> str:
        """One line of JSON (no newline)."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict) -> PageResult:
        """A result from a schema object; ValueError if ``d`` is not one (a field missing or mistyped)."""
        if not isinstance(d, dict):
            raise ValueError(f"not a JSON object but {type(d).__name__}")
        for name in _REQUIRED:
            if name not in d:
                raise ValueError(f"no {name!r} field")
        for name, check in _FIELD_CHECKS.items():
            if name in d and not check(d[name]):
                raise ValueError(f"the {name!r} field has the wrong type")
        return cls(**{k: d[k] for k in _FIELD_CHECKS if k in d})

    @classmethod
    def from_json(cls, s: str) -> PageResult:
        return cls.from_dict(json.loads(s))

    @classmethod
    def failed(cls, source: str | os.PathLike, page: int, task: str, model: str, error: str) -> PageResult:
        """A page (or document, page 0) that produced no result; ``source`` as for the constructor."""
        return cls(source=source, page=page, task=task, model=model, error=str(error))
