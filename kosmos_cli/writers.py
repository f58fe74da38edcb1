"""Results → files and stdout: the page result schema, atomic writes, resume, overlays.

Output layout under ``-o OUT`` (``<stem>`` is the document's relative stem from
`kosmos_cli.documents`, e.g. ``invoice`` or ``2024/03/invoice`` — subfolders are mirrored)::

    OUT/
    ├── <stem>.md                        md:     the selected pages' markdown, "<!-- page N -->" before each
    ├── <stem>.txt                       ocr:    "x0,y0,x1,y0,x1,y1,x0,y1,text" lines
    │                                    ground: the caption
    ├── <stem>.json                      ocr, ground: {"source", "task", "model", "pages": [page objects]}
    ├── <stem>.overlay-0003.png          --overlay: page 3 with OCR polygons / labelled grounding boxes
    └── .kosmos/<task>/<stem>/0003.json  resume state: finished page 3, one page object (JSONL schema)

In ``.txt`` files pages are separated by a form-feed line (``"\\f\\n"``, as pdftotext does); polygons
are in each page's own pixels. A single-page selection (``pages == [1]``) gets no ``<!-- page -->``
comment. ``ocr`` and ``ground`` both write ``.txt``/``.json``: give them different OUT folders.

A page that failed keeps its place in the document: ``.md`` gets ``<!-- page N: error: reason -->``
instead of its text, ``.txt`` an empty page section (the form feeds stay aligned with the pages),
``.json`` the page object with ``"error"`` set (`OutputDir.failed_pages` lists such pages).

Names always fit the file system: a component longer than NAME_MAX (255 bytes, counted in the
file-system encoding) cannot be created. When a stem's last component plus the longest suffix
(``.overlay-NNNN.png``, 17 bytes) would not fit, it is cut at a character boundary and ``~`` plus 8
hex digits of the SHA-1 of the whole component are appended; every file of the document (and its
state folder) uses that one shortened name, which is the same in every run (only an overlay of page
10000 or later, with a longer suffix, may be cut further). Names that fit are used as they are.

Every text written (``.md``, ``.txt``, ``.json``, page files) is valid UTF-8: a result's ``source``
is `display_path` text (an undecodable byte of a file name as ``\\xHH``), and any other string with
lone surrogates has them written out as ``\\udcXX``.

Resume, in four rules:
1. Every finished page is stored at once, atomically, as ``.kosmos/<task>/<stem>/NNNN.json``. A
   failed page is stored too, with ``"error"`` set, so its document can still be assembled (with a
   placeholder), but it does not count as done.
2. After storing a page, `OutputDir.assemble` (re)writes the document's files, atomically, if and only
   if every page selected for the document in this run has a page file. The files hold exactly those
   pages, in page order (the command's selection, not whatever earlier runs left behind).
3. A re-run skips pages that are done (`OutputDir.is_done`: page file present, no error, same model),
   unless ``overwrite``; skipped pages are still read back when the document is assembled.
4. Every file is replaced atomically (temp file in the same folder, fsync, ``os.replace``), so a crash
   leaves the old or the new version of a file, never a torn one; a document file that lags its page
   files is rebuilt by the next run. Deleting OUT (or ``.kosmos``) starts from scratch.
The state folder is hidden so that ``ls OUT`` shows results and directory inputs skip it.

A file whose content would not change is left untouched (same inode and mtime): a re-run of a
finished command writes nothing, and make or rsync see nothing new.
A page file that cannot be read back (torn, not a page object) is reported through ``warn``, once,
and counts as missing: the page is redone.
A file that cannot be written raises `OutputError`, which names it and says why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "OutputDir",
    "OutputError",
    "PageResult",
    "atomic_open",
    "atomic_save_png",
    "atomic_write_bytes",
    "atomic_write_text",
    "display_path",
    "draw_overlay",
    "format_caption",
    "format_jsonl",
    "format_markdown",
    "format_ocr",
    "format_text",
    "iter_jsonl",
    "page_comment",
    "task_kind",
]

_TASKS = {"md": "md", "markdown": "md", "ocr": "ocr", "ground": "ground", "grounding": "ground"}
STATE_DIR = ".kosmos"
PAGE_SEPARATOR = "\f\n"  # between pages in .txt files
NAME_MAX = 255  # bytes in one path component (ext4, APFS, NTFS in UTF-16 units, which are fewer)
# Every file of a document shares one base name, which leaves room for the longest suffix
# (.md, .txt, .json, .pdf, .hocr, .alto.xml are all shorter than an overlay's).
_LONGEST_SUFFIX = ".overlay-0000.png"

# Read the umask once (os.umask can only be read by setting it, which is not thread-safe later).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def task_kind(task: str) -> str:
    """Normalise a task name: ``md``/``markdown`` → ``md``, ``ocr``, ``ground``/``grounding`` → ``ground``."""
    try:
        return _TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r} (expected one of {sorted(set(_TASKS))})") from None


# --------------------------------------------------------------------------------------------------
# The page result (the JSONL schema of DESIGN.md)
# --------------------------------------------------------------------------------------------------


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


def _valid_utf8(text: str) -> str:
    """``text`` with any lone surrogate written out as ``\\udcXX``, so that it encodes as UTF-8.

    For messages and model text, where nothing needs to be undone; paths go through `display_path`."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _source_text(source: str | os.PathLike) -> str:
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
        return _valid_utf8(obj)
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


def _is_line(value: Any) -> bool:
    """``{"text": str, "polygon": [numbers]}``, what `format_ocr` needs."""
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

    def __post_init__(self):
        self.source = _source_text(self.source)

    def to_dict(self) -> dict:
        """The schema's fields in order; every string valid UTF-8."""
        return _plain({
            "source": _source_text(self.source),
            "page": int(self.page),
            "task": self.task,
            "model": self.model,
            "width": int(self.width),
            "height": int(self.height),
            "text": self.text,
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


# --------------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------------


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
    return OutputError(path, _valid_utf8(err.strerror or str(err)), err.errno)


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
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kosmos-", suffix=".tmp")
    except OSError as err:
        raise _output_error(path, err) from err
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:  # mkstemp makes 0600 files; give the result the mode a plain open() would
            mode = os.stat(path).st_mode & 0o777
        except OSError:
            mode = 0o666 & ~_UMASK
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
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


def _store(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically unless the file holds exactly that already: an unchanged
    file keeps its inode and mtime, which make and rsync go by."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    except OSError:
        pass  # absent or unreadable: write it, and a real problem surfaces as an OutputError there
    atomic_write_bytes(path, data)


# --------------------------------------------------------------------------------------------------
# Text formats (stdout and document files)
# --------------------------------------------------------------------------------------------------


def _as_dict(result: PageResult | dict) -> dict:
    return result.to_dict() if isinstance(result, PageResult) else result


def format_markdown(result: PageResult | dict) -> str:
    """The page's markdown."""
    return _as_dict(result)["text"]


def format_ocr(result: PageResult | dict) -> str:
    """The page's lines as ``x0,y0,x1,y0,x1,y1,x0,y1,text``, one per line, no trailing newline."""
    lines = _as_dict(result)["lines"]
    return "\n".join(",".join(str(int(v)) for v in ln["polygon"]) + "," + ln["text"] for ln in lines)


def format_caption(result: PageResult | dict) -> str:
    """The grounded caption (tags removed)."""
    return _as_dict(result)["text"]


def format_text(result: PageResult | dict) -> str:
    """The plain stdout form of a page for its task (markdown, OCR lines, or caption)."""
    d = _as_dict(result)
    kind = task_kind(d["task"])
    return {"md": format_markdown, "ocr": format_ocr, "ground": format_caption}[kind](d)


def format_jsonl(result: PageResult | dict) -> str:
    """One JSON line (no newline)."""
    return result.to_json() if isinstance(result, PageResult) else json.dumps(result, ensure_ascii=False)


def page_comment(page: int, error: str | None = None, source: str | os.PathLike | None = None) -> str:
    """``<!-- page 3 -->`` (with the source or an error when given), safe inside markdown and valid
    UTF-8; ``source`` as for `PageResult` (a path object is displayed, a str is display text)."""
    parts = []
    if source is not None:
        parts.append(_source_text(source))
    parts.append(f"page {page}")
    body = ", ".join(parts)
    if error:
        body += f": error: {_valid_utf8(str(error))}"
    return "<!-- " + body.replace("--", "- -") + " -->"


# --------------------------------------------------------------------------------------------------
# The output folder
# --------------------------------------------------------------------------------------------------


class OutputDir:
    """The ``-o OUT`` folder for one task: page state, document assembly and overlays.

    Typical use (see the module docstring for the layout and the resume rules)::

        out = OutputDir("out", "ocr", model=model_id, overwrite=False)
        jobs = iter_pages(files, pages, dpi, skip=lambda j: out.is_done(j.stem, j.page))
        for job in prefetch(jobs):
            ... out.write_page(job.stem, result); out.assemble(job.stem, job.selected)

    ``warn`` is called with a message, once per page file that exists but cannot be read back
    (the page is then redone); writes that fail raise `OutputError`.
    """

    def __init__(self, root: str | os.PathLike, task: str, *, model: str | None = None, overwrite: bool = False,
                 warn: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.task = task
        self.kind = task_kind(task)
        self.model = model
        self.overwrite = overwrite
        self.warn = warn or (lambda message: None)
        self._warned: set[Path] = set()
        self._warned_lock = threading.Lock()  # is_done runs in the prefetch thread, assemble in the caller's

    def __repr__(self) -> str:
        return f"OutputDir({str(self.root)!r}, task={self.task!r})"

    # paths
    @staticmethod
    def _name(folder: Path, stem: str, suffix: str = "") -> Path:
        """``folder/<stem><suffix>``, every component fitting NAME_MAX (see the module docstring)."""
        *parents, last = stem.split("/")
        room = NAME_MAX - max(len(_LONGEST_SUFFIX), len(os.fsencode(suffix)))
        return folder.joinpath(*(_fit(p, NAME_MAX) for p in parents), _fit(last, room) + suffix)

    def page_file(self, stem: str, page: int) -> Path:
        return self._name(self.root / STATE_DIR / self.kind, stem) / f"{page:04d}.json"

    def overlay_file(self, stem: str, page: int) -> Path:
        return self._name(self.root, stem, f".overlay-{page:04d}.png")

    def document_files(self, stem: str) -> list[Path]:
        """The files `assemble` writes for ``stem``."""
        exts = {"md": [".md"], "ocr": [".txt", ".json"], "ground": [".txt", ".json"]}[self.kind]
        return [self._name(self.root, stem, ext) for ext in exts]

    # pages
    def read_page(self, stem: str, page: int) -> PageResult | None:
        """The stored page, or None if absent or unusable (reported once through ``warn``)."""
        path = self.page_file(stem, page)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            problem = err.strerror or str(err)
        else:
            try:
                result = PageResult.from_json(data.decode("utf-8"))
                if result.page == page:
                    return result
                problem = f"it holds page {result.page}"
            except ValueError as err:  # invalid UTF-8 or JSON, or not a page object
                problem = str(err)
        with self._warned_lock:
            first = path not in self._warned
            self._warned.add(path)
        if first:
            self.warn(f"{display_path(path)}: unreadable page state ({_valid_utf8(problem)}); "
                      f"page {page} will be redone")
        return None

    def is_done(self, stem: str, page: int) -> bool:
        """True if the page needs no work: stored without error, by the same model, and not overwriting."""
        if self.overwrite:
            return False
        r = self.read_page(stem, page)
        return r is not None and r.error is None and (self.model is None or r.model == _valid_utf8(self.model))

    def failed_pages(self, stem: str, pages: Sequence[int]) -> list[int]:
        """The pages of ``pages`` stored with an error: the ones with a placeholder in the document."""
        return [p for p in sorted(set(pages)) if (r := self.read_page(stem, p)) is not None and r.error is not None]

    def write_page(self, stem: str, result: PageResult) -> Path:
        """Store one page's result atomically (rule 1); returns the page file."""
        path = self.page_file(stem, result.page)
        _store(path, (result.to_json() + "\n").encode("utf-8"))
        return path

    def write_overlay(self, stem: str, page: int, image: Image.Image) -> Path:
        path = self.overlay_file(stem, page)
        png = io.BytesIO()
        image.save(png, format="PNG")
        _store(path, png.getvalue())
        return path

    # documents
    def assemble(self, stem: str, pages: Sequence[int]) -> list[Path]:
        """Write the document files if every page in ``pages`` is stored (rule 2).

        Returns the document's files (rewritten only where their content changed), or [] while
        pages are missing. Failed pages get placeholders (see the module docstring).
        """
        results = []
        for page in sorted(set(pages)):
            r = self.read_page(stem, page)
            if r is None:
                return []
            results.append(r)
        if not results:
            return []
        contents = self._render_document(results)
        paths = self.document_files(stem)
        for path, text in zip(paths, contents):
            _store(path, text.encode("utf-8"))
        return paths

    def _render_document(self, results: list[PageResult]) -> list[str]:
        single = [r.page for r in results] == [1]
        if self.kind == "md":
            parts = []
            for r in results:
                if r.error is not None:
                    parts.append(page_comment(r.page, r.error))
                elif single:
                    parts.append(format_markdown(r))
                else:
                    parts.append(page_comment(r.page) + "\n\n" + format_markdown(r))
            return ["\n\n".join(p.rstrip("\n") for p in parts) + "\n"]
        fmt = format_ocr if self.kind == "ocr" else format_caption
        txt = PAGE_SEPARATOR.join(_terminated(fmt(r) if r.error is None else "") for r in results)
        first = results[0]
        doc = {
            "source": first.to_dict()["source"],
            "task": first.task,
            "model": first.model,
            "pages": [r.to_dict() for r in results],
        }
        return [txt, json.dumps(doc, ensure_ascii=False, indent=1) + "\n"]


def _fit(name: str, room: int) -> str:
    """``name`` if it takes at most ``room`` bytes on disk; else its longest prefix of whole characters
    that leaves room for ``~`` and 8 hex digits of the SHA-1 of the whole name (distinct and stable)."""
    raw = os.fsencode(name)
    if len(raw) <= room:
        return name
    tag = "~" + hashlib.sha1(raw).hexdigest()[:8]
    budget, used, cut = room - len(tag), 0, 0
    for ch in name:  # a surrogate escape is one byte, a UTF-8 character one to four
        used += len(os.fsencode(ch))
        if used > budget:
            break
        cut += 1
    return name[:cut] + tag


def _terminated(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


# --------------------------------------------------------------------------------------------------
# Overlays
# --------------------------------------------------------------------------------------------------

_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (128, 128, 0), (0, 128, 128), (170, 110, 40)]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow without FreeType
        return ImageFont.load_default()


def draw_overlay(image: Image.Image, result: PageResult | dict) -> Image.Image:
    """A copy of the page with the OCR polygons, or the grounding boxes labelled with their phrase.

    Coordinates are scaled from the result's width/height to the image if they differ; grounding
    boxes may be normalised (0–1) or in pixels.
    """
    d = _as_dict(result)
    im = image.convert("RGB") if image.mode != "RGB" else image.copy()
    w, h = im.size
    sx = w / d["width"] if d.get("width") else 1.0
    sy = h / d["height"] if d.get("height") else 1.0
    lw = max(2, round(max(w, h) / 600))
    draw = ImageDraw.Draw(im)
    for i, line in enumerate(d.get("lines") or []):
        poly = line.get("polygon") if isinstance(line, dict) else None
        if not poly or len(poly) < 8:
            continue
        pts = [(poly[k] * sx, poly[k + 1] * sy) for k in range(0, len(poly) - 1, 2)]
        draw.polygon(pts, outline=_PALETTE[i % 3], width=lw)
    font = _font(max(12, round(max(w, h) / 60)))
    for i, ent in enumerate(d.get("entities") or []):
        color = _PALETTE[i % len(_PALETTE)]
        for box in ent.get("boxes") or []:
            x0, y0, x1, y1 = (float(v) for v in box[:4])
            if max(x0, y0, x1, y1) <= 1.0:  # normalised
                x0, x1, y0, y1 = x0 * w, x1 * w, y0 * h, y1 * h
            else:
                x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
            draw.rectangle([x0, y0, x1, y1], outline=color, width=lw)
            label = str(ent.get("text", ""))
            if label:
                l, t, r, b = draw.textbbox((0, 0), label, font=font)
                tw, th = r - l + 2 * lw, b - t + 2 * lw
                ty = y0 - th if y0 - th >= 0 else y0  # above the box, or inside at the top edge
                draw.rectangle([x0, ty, x0 + tw, ty + th], fill=color)
                draw.text((x0 + lw - l, ty + lw - t), label, fill=(255, 255, 255), font=font)
    return im


def iter_jsonl(lines: Iterable[str]) -> Iterator[PageResult]:
    """Parse ``--format jsonl`` output back into PageResults (blank lines ignored)."""
    for line in lines:
        if line.strip():
            yield PageResult.from_json(line)
