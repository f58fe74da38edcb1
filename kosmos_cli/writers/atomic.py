"""Atomic files: a result file is the old version or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from PIL import Image

from ..paths import display_path
from ..results import valid_utf8

__all__ = ["OutputError", "atomic_open", "atomic_save_png", "atomic_write_bytes", "atomic_write_text", "check_writable",
           "store"]


class OutputError(OSError):
    """A result file that could not be written; ``str()`` is ``cannot write <path>: <reason>``.

    ``path`` is the file meant (never a temp file), ``reason`` why, in the system's words;
    ``errno`` is kept from the failure. Nothing is left half-written (see `atomic_open`)."""

    def __init__(self, path: str | os.PathLike, reason: str, errno: int | None = None):
        super().__init__(errno, reason)
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot write {display_path(self.path)}: {self.reason}"


def _output_error(path: Path, err: OSError) -> OutputError:
    return OutputError(path, valid_utf8(err.strerror or str(err)), err.errno)


def _temp_name(folder: Path) -> str:
    """``folder/.kosmos-XXXXXXXX.tmp``: random, so that no other file has it."""
    return os.path.join(folder, f".kosmos-{secrets.token_hex(4)}.tmp")


def _open_temp(tmp: str) -> int:
    """Create ``tmp`` (it must not exist) for writing, mode 0666 so that the process's umask applies as
    for a plain open() (mkstemp would make it 0600, and reading the umask means setting it, which
    races with other threads)."""
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)


def _discard(tmp: str, err: BaseException) -> None:
    """Remove our temp file after ``err``. The name is chosen before the file is created, so a Ctrl-C
    at any moment (even between the creation and the next line) leaves nothing: whatever exists
    under that name is ours, unless the creation itself failed because the name was taken."""
    if not (isinstance(err, FileExistsError) and err.filename == tmp):
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def check_writable(folder: Path) -> None:
    """Create and remove a file in ``folder``; OSError if that is not possible."""
    tmp = _temp_name(folder)
    try:
        os.close(_open_temp(tmp))
    except BaseException as err:
        _discard(tmp, err)
        raise
    os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Write ``path`` atomically: yields a binary file in the same folder; on success it is fsynced
    and renamed over ``path``; on any exception (KeyboardInterrupt included) it is removed and
    ``path`` is untouched. Parent folders are created.

    Any OSError on the way (the caller's writes included) is raised as `OutputError` naming ``path``.
    The temp file has a short name of its own (``.kosmos-XXXXXXXX.tmp``), so a target whose name is
    as long as the file system allows can still be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        folder = display_path(err.filename if err.filename is not None else path.parent)
        raise OutputError(path, f"cannot create folder {folder}: {err.strerror or err}", err.errno) from err
    tmp = _temp_name(path.parent)
    try:
        with os.fdopen(_open_temp(tmp), "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:  # a replaced file keeps its mode
            mode = os.stat(path).st_mode & 0o777
        except OSError:
            mode = None
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        _discard(tmp, err)
        if isinstance(err, OSError) and not isinstance(err, OutputError):
            raise _output_error(path, err) from err
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see `atomic_open`)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_png(path: str | os.PathLike, image: Image.Image) -> None:
    """Save ``image`` as PNG at ``path`` atomically."""
    with atomic_open(path) as f:
        image.save(f, format="PNG")


def store(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically unless the file holds exactly that already: an unchanged
    file keeps its inode and mtime, which make and rsync go by."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    except OSError:
        pass  # absent or unreadable: write it, and a real problem surfaces as an OutputError there
    atomic_write_bytes(path, data)
