"""Paths and file-system facts as users read them: a path as text, why an OS call failed, why a file is no document."""

from __future__ import annotations

import os
import stat

__all__ = ["display_path", "not_regular", "os_reason"]


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


def os_reason(err: OSError) -> str:
    """The reason of an OSError as our messages word it: "permission denied", "no such file or
    directory", else the error's own ``reason`` (writers.OutputError), strerror or text, lower-cased."""
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, FileNotFoundError):
        return "no such file or directory"
    reason = getattr(err, "reason", None) or err.strerror or str(err)
    return reason[:1].lower() + reason[1:]


_FILE_KINDS = ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
               (stat.S_ISBLK, "block device"))


def not_regular(mode: int) -> str | None:
    """Why a file of this st_mode is no document ("not a regular file (named pipe)"), or None."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "special file")
    return f"not a regular file ({kind})"
