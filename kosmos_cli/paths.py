"""Paths as users read them: in messages, on stdout and in JSON."""

from __future__ import annotations

import os


def display_path(path: str | os.PathLike) -> str:
    """A path as valid UTF-8 text, for JSON, stdout and messages, reversible to the file's bytes.

    On POSIX a file name is bytes; Python keeps bytes that are not UTF-8 as lone surrogates, which
    cannot be written as UTF-8. Each such byte becomes ``\\xHH`` (two hex digits) and, so that the
    mapping can be undone, a literal backslash becomes ``\\\\``. Every other character is unchanged:
    ``caf<0xE9>.png`` → ``caf\\xe9.png``, ``a\\b.png`` → ``a\\\\b.png``, ``café.png`` → ``café.png``."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if os.sep != "/":  # Windows names are UTF-16 and use the backslash as the separator
        return text.encode("utf-8", "replace").decode("utf-8")
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif "\udc80" <= ch <= "\udcff":  # surrogateescape's stand-in for one undecodable byte
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif "\ud800" <= ch <= "\udfff":  # any other lone surrogate (not from a file name)
            out.append("\ufffd")
        else:
            out.append(ch)
    return "".join(out)
