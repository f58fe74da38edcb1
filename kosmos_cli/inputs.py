"""Inputs: the documents a run reads, their output stems, and the page selection.

    collect_inputs(["scans/", "*.png", "-"])  ->  [InputFile(path, stem)], [InputError]
    parse_pages("1-3,7")  ->  PageSelection; .select(n_pages) -> (pages, out_of_range)

Inputs
------
An input argument is a file, a directory (walked recursively), a glob (``*``, ``?``, ``[...]``, and
``**`` for any depth), or ``-``: paths read from stdin, one a line (blank lines ignored; these are
literal paths, files or directories, never globs). Directory walks and glob matches keep only
supported extensions (case-insensitive: .pdf .png .jpg .jpeg .tif .tiff .webp .bmp .gif), skip hidden
names (starting with ``.``; a glob part that starts with ``.`` matches them), do not follow symlinked
directories (a directory named literally, or a glob's fixed leading folders, may be a symlink), and
are sorted naturally (``scan2.png`` before ``scan10.png``). Only regular files are documents: walks and
globs skip others (named pipes, sockets, devices) with a note, an `InputError` whose ``warning`` is
set; a file named explicitly must be a regular file with a supported extension.
Missing paths, globs that match nothing and unsupported files become `InputError`s, never exceptions.
Files are deduplicated by their resolved path, first occurrence wins.

Output stems
------------
Every input gets a relative output *stem* (posix string, no extension) that mirrors subfolders, so
the writer can put ``<out>/<stem>.md`` etc. and two ``doc.pdf`` never collide:

- the stem is the path relative to the input's *root* without the extension, where the root is the
  directory argument itself (``scans/`` → ``a/doc``, ``b/doc``), the fixed leading part of a glob
  (``scans/**/*.pdf`` → root ``scans``), or, for a file argument or a stdin line, the file's folder
  (``scans/a/doc.pdf`` → ``doc``);
- stems that still collide within one run (compared case-insensitively) are disambiguated: first by
  keeping the extension (``doc.pdf`` / ``doc.png``), then by the path relative to the colliding
  files' common folder (``a/doc``, ``b/doc`` for the two files ``scans/a/doc.pdf scans/b/doc.pdf``),
  and as a last resort by a ``~2``, ``~3`` suffix in input order.
Stems depend only on the arguments and the files they match, so re-running the same command maps
every file to the same stem (needed for resume).
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .paths import not_regular, os_reason

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "InputError",
    "InputFile",
    "PageSelection",
    "assign_stems",
    "collect_inputs",
    "format_ranges",
    "parse_pages",
    "relative_stem",
    "unsupported_type",
]

SUPPORTED_EXTENSIONS = frozenset({".pdf", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif"})
_SUPPORTED_LIST = ", ".join(sorted(SUPPORTED_EXTENSIONS))


def unsupported_type(suffix: str) -> str:
    """The reason given for a file whose extension is not in SUPPORTED_EXTENSIONS."""
    return f"unsupported file type {suffix or '(none)'!r} ({_SUPPORTED_LIST})"


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputError:
    """An input argument (or stdin line) that yields nothing: missing, unsupported, empty glob, …

    ``warning`` marks notes that are not failures (a named pipe skipped in a folder).
    """

    path: str
    reason: str
    warning: bool = False

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class InputFile:
    """One document to process: its path (as given or found) and its relative output stem."""

    path: Path
    stem: str


def _natural_key(path: Path) -> tuple:
    """Sort key: per path component, digit runs compare as numbers ("p2" < "p10"), case-insensitive."""
    return tuple(
        tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", part.casefold()))
        for part in path.parts
    )


def _supported(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED_EXTENSIONS


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def _glob_root(pattern: str) -> Path:
    """The fixed leading folders of a glob: ``scans/2024/*/p*.png`` → ``scans/2024``."""
    parts = Path(pattern).parts
    fixed: list[str] = []
    for part in parts[:-1]:
        if _has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _walk(directory: Path, errors: list[InputError]) -> list[Path]:
    """Supported regular files under ``directory``, recursively, hidden names skipped, naturally sorted."""
    found: list[Path] = []

    def onerror(exc: OSError) -> None:
        errors.append(InputError(str(exc.filename or directory), os_reason(exc)))

    for dirpath, dirnames, filenames in os.walk(directory, onerror=onerror):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            p = Path(dirpath, name)
            if not name.startswith(".") and _supported(p) and _regular(p, errors):
                found.append(p)
    found.sort(key=lambda p: _natural_key(p.relative_to(directory)))
    return found


def _regular(path: Path, errors: list[InputError]) -> bool:
    """False, with a note, for a found file that is not a regular file (opening a FIFO would hang)."""
    try:
        why = not_regular(path.stat().st_mode)
    except OSError:  # a broken symlink or a race: opening it reports the precise error
        return True
    if why:
        errors.append(InputError(str(path), f"{why}, skipped", warning=True))
    return why is None


def _glob(pattern: str) -> list[Path]:
    """Paths matching ``pattern`` like ``glob.glob(recursive=True)``, but without following symlinked
    directories (a loop like ``self -> .`` would make glob run forever), deduplicated, unsorted."""
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if _has_magic(part))
    return list(dict.fromkeys(_match(Path(*parts[:first]), parts[first:])))


def _match(base: Path, parts: tuple[str, ...]) -> Iterator[Path]:
    """Paths below ``base`` that match the pattern parts ``parts`` (see `_glob`)."""
    head, rest = parts[0], parts[1:]
    if head == "**":
        if not rest:  # everything below base: the walk of base finds it
            yield base
            return
        yield from _match(base, rest)  # ** matches no folder too
        for entry in _entries(base):
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                yield from _match(base / entry.name, parts)
    elif not _has_magic(head):  # a literal part, as typed: followed even if it is a symlink
        path = base / head
        if not rest:
            if os.path.lexists(path):
                yield path
        elif path.is_dir():
            yield from _match(path, rest)
    else:
        for entry in _entries(base):
            if entry.name.startswith(".") and not head.startswith("."):
                continue
            if not fnmatch.fnmatch(entry.name, head):
                continue
            if entry.is_dir(follow_symlinks=False):
                if rest:
                    yield from _match(base / entry.name, rest)
                else:
                    yield base / entry.name
            elif not rest and not entry.is_dir():  # a file, or a symlink to one (not to a folder)
                yield base / entry.name


def _entries(directory: Path) -> list[os.DirEntry]:
    """The entries of ``directory``, none if it cannot be read."""
    try:
        with os.scandir(directory) as it:
            return list(it)
    except OSError:  # unreadable or vanished: matches nothing, as with glob
        return []


def collect_inputs(
    inputs: Sequence[str | os.PathLike],
    stdin: TextIO | None = None,
    *,
    exclude: Iterable[str | os.PathLike] = (),
) -> tuple[list[InputFile], list[InputError]]:
    """Expand input arguments into documents with their output stems (see the module docstring).

    ``stdin`` is read (once) when an argument is ``-``; default ``sys.stdin``. Files under any path in
    ``exclude`` (e.g. the output folder when it sits inside an input folder) are skipped.
    Returns the files in argument order, deduplicated, and one InputError per argument that failed.
    """
    errors: list[InputError] = []
    found: list[tuple[Path, Path]] = []  # (path, root)
    stdin_read = False
    excluded = [Path(e).resolve() for e in exclude]

    def add_path(arg: str) -> None:
        """A literal path: file or directory."""
        p = Path(arg)
        try:
            is_dir = p.is_dir()
            exists = is_dir or p.exists()
            why = not_regular(p.stat().st_mode) if exists and not is_dir else None
        except OSError as exc:  # e.g. a parent folder without search permission
            errors.append(InputError(arg, os_reason(exc)))
            return
        if not exists:
            kind = "broken symlink" if p.is_symlink() else "no such file or directory"
            errors.append(InputError(arg, kind))
        elif is_dir:
            files = _walk(p, errors)
            if not files:
                errors.append(InputError(arg, f"no supported files in directory ({_SUPPORTED_LIST})"))
            found.extend((f, p) for f in files)
        elif why:
            errors.append(InputError(arg, why))
        elif not _supported(p):
            errors.append(InputError(arg, unsupported_type(p.suffix)))
        else:
            found.append((p, p.parent))

    for raw in inputs:
        arg = os.fspath(raw)
        if arg == "-":
            if stdin_read:
                continue
            stdin_read = True
            stream = sys.stdin if stdin is None else stdin
            for line in stream:
                line = line.rstrip("\r\n")
                if line.strip():
                    add_path(line)
        elif _has_magic(arg) and not os.path.lexists(arg):
            root = _glob_root(arg)
            matches = sorted(_glob(arg), key=_natural_key)
            n_before = len(found)
            for mp in matches:
                if mp.is_dir():
                    found.extend((f, root) for f in _walk(mp, errors))
                elif _supported(mp) and _regular(mp, errors):
                    found.append((mp, root))
            if len(found) == n_before:
                why = "no supported files match" if matches else "no files match"
                errors.append(InputError(arg, why))
        else:
            add_path(arg)

    files: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for path, root in found:
        real = path.resolve()
        if real in seen or any(real == e or e in real.parents for e in excluded):
            continue
        seen.add(real)
        files.append((path, root))
    stems = assign_stems(files)
    return [InputFile(p, s) for (p, _), s in zip(files, stems)], errors


# --------------------------------------------------------------------------------------------------
# Output stems
# --------------------------------------------------------------------------------------------------


def relative_stem(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``path`` relative to ``root``, without the extension, as a posix string (``a/doc``)."""
    path, root = Path(path), Path(root)
    try:
        rel = path.relative_to(root)
    except ValueError:
        try:
            rel = path.resolve().relative_to(Path(root).resolve())
        except ValueError:
            rel = Path(path.name)
    return rel.with_suffix("").as_posix() if rel.suffix else rel.as_posix()


def assign_stems(files: Sequence[tuple[Path, Path] | Path]) -> list[str]:
    """Unique output stems for ``(path, root)`` pairs (a bare path uses its folder as root).

    Collision rules are in the module docstring; the result is aligned with ``files``.
    """
    pairs = [(Path(f), Path(f).parent) if not isinstance(f, tuple) else (Path(f[0]), Path(f[1])) for f in files]
    stems = [relative_stem(p, r) for p, r in pairs]

    def groups() -> list[list[int]]:
        by_key: dict[str, list[int]] = {}
        for i, s in enumerate(stems):
            by_key.setdefault(s.casefold(), []).append(i)
        return [g for g in by_key.values() if len(g) > 1]

    def unique(candidates: list[str]) -> bool:
        return len({c.casefold() for c in candidates}) == len(candidates)

    for group in groups():
        # 1. keep the extension: doc.pdf / doc.png
        with_ext = [f"{stems[i]}{pairs[i][0].suffix}" for i in group]
        if unique(with_ext):
            for i, s in zip(group, with_ext):
                stems[i] = s
            continue
        # 2. relative to the common folder of the colliding files: a/doc, b/doc
        real = [pairs[i][0].resolve() for i in group]
        common = Path(os.path.commonpath([r.parent for r in real]))
        rel = [r.relative_to(common) for r in real]
        cands = [r.with_suffix("").as_posix() for r in rel]
        if not unique(cands):
            cands = [r.as_posix() for r in rel]
        if unique(cands):
            for i, s in zip(group, cands):
                stems[i] = s
    # 3. anything still colliding (also with stems created above): numbered in input order
    for group in groups():
        for n, i in enumerate(group[1:], start=2):
            stems[i] = f"{stems[i]}~{n}"
    return stems


# --------------------------------------------------------------------------------------------------
# Page selection
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PageSelection:
    """Parsed ``--pages``: 1-based inclusive ranges; ``end=None`` means "to the last page"."""

    ranges: tuple[tuple[int, int | None], ...]
    spec: str = ""

    def select(self, n_pages: int) -> tuple[list[int], list[tuple[int, int | None]]]:
        """``(pages, out_of_range)``: selected 1-based pages in ascending order without duplicates,
        and the requested ranges (clipped) that lie past the document's end, for reporting."""
        pages: set[int] = set()
        missing: list[tuple[int, int | None]] = []
        for start, end in self.ranges:
            stop = n_pages if end is None else min(end, n_pages)
            pages.update(range(start, stop + 1))
            if end is None:
                if start > n_pages:
                    missing.append((start, None))
            elif end > n_pages:
                missing.append((max(start, n_pages + 1), end))
        return sorted(pages), missing

    def __str__(self) -> str:
        return self.spec or format_ranges(self.ranges)


def format_ranges(ranges: Iterable[tuple[int, int | None]]) -> str:
    """``[(1, 3), (7, 7), (9, None)]`` → ``"1-3,7,9-"``."""
    out = []
    for a, b in ranges:
        out.append(f"{a}-" if b is None else (str(a) if a == b else f"{a}-{b}"))
    return ",".join(out)


def parse_pages(spec: str) -> PageSelection:
    """Parse a page selection such as ``1-3,7``, ``5-`` (to the end) or ``-3`` (first three); 1-based.

    Raises ValueError naming the offending part on bad syntax, page 0, or a reversed range.
    """
    if spec is None or not str(spec).strip():
        raise ValueError("empty page selection (expected e.g. '1-3,7', '5-' or '-3')")
    ranges: list[tuple[int, int | None]] = []
    for part in str(spec).split(","):
        item = part.strip()
        # "7", "1-3", "5-" (to the end), "-3" (from the start)
        m = re.fullmatch(r"(\d+)|(\d*)\s*-\s*(\d*)", item)
        if not m or (m.group(1) is None and not (m.group(2) or m.group(3))):
            raise ValueError(
                f"invalid page selection {spec!r}: bad part {item!r} (expected e.g. '1-3,7', '5-' or '-3')"
            )
        if m.group(1) is not None:
            a, b = int(m.group(1)), int(m.group(1))
        else:
            a = int(m.group(2)) if m.group(2) else 1
            b = int(m.group(3)) if m.group(3) else None
        if a < 1 or (b is not None and b < 1):
            raise ValueError(f"invalid page selection {spec!r}: pages are numbered from 1, got {item!r}")
        if b is not None and b < a:
            raise ValueError(f"invalid page selection {spec!r}: range {item!r} ends before it starts")
        ranges.append((a, b))
    return PageSelection(tuple(ranges), str(spec).strip())


