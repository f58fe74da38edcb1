"""File-system facts worded for our messages: why an OS call failed, why a file is no document."""

from __future__ import annotations

import stat

__all__ = ["not_regular", "os_reason"]


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
