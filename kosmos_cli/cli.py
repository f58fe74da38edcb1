"""The `kosmos` command: thin Typer layer (flags -> library calls -> exit code).

Exit codes: 0 every page done; 1 some inputs or pages failed (each named on stderr, the rest still
written); 2 usage error (bad flag, nothing to do); 130 interrupted; 141 stdout closed by its reader."""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Annotated, Iterator, Optional

import click
import typer

from . import documents, interrupt, writers
from .documents import ErrorJob, PageJob
from .writers import display_path


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Transcribe documents with Kosmos-2.5 (markdown, OCR lines with polygons) and ground captions "
    "with Kosmos-2. Results go to stdout (or to files with -o); progress and errors go to stderr.",
)

INPUTS_HELP = "Files (PDF, PNG, JPEG, TIFF, WebP, BMP, GIF), directories (searched recursively), globs, or - to read paths from stdin."
PROMPT_RULE = ("A last argument that starts with < is the prompt (default \"<grounding> An image of\"); anything "
               "else is an input. Use --prompt for other prompts and ./<name> for a file whose name starts with <.")


@dataclass
class Options:
    """The flags every command shares."""

    output: Optional[Path] = None
    model: Optional[str] = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: str = "auto"
    max_new_tokens: Optional[int] = None
    pages: Optional[str] = None
    dpi: float = documents.DEFAULT_DPI
    password: Optional[str] = None
    format: str = "text"
    overlay: bool = False
    overwrite: bool = False
    quiet: bool = False
    debug: bool = False
    compile: Optional[bool] = None
    attention: str = "auto"  # from KOSMOS_ATTENTION, not a flag: a setting for experiments (see README)


# One alias per shared flag; each command below lists them, so a flag can be grepped to its command.
Inputs = Annotated[list[str], typer.Argument(help=INPUTS_HELP, show_default=False)]
GroundInputs = Annotated[list[str], typer.Argument(help=INPUTS_HELP + " " + PROMPT_RULE, show_default=False)]
Output = Annotated[Optional[Path], typer.Option("--output", "-o", help="Write files under this directory (mirrors input subfolders) instead of stdout; re-runs skip finished pages.")]
Model = Annotated[Optional[str], typer.Option("--model", "-m", help="Hugging Face repo id or local checkpoint directory. [default: microsoft/kosmos-2.5 for ocr/md, microsoft/kosmos-2-patch14-224 for ground]")]
Device = Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda, cuda:N.")]
DType = Annotated[str, typer.Option(help="auto (bf16 on Ampere and newer GPUs, fp16 on older ones, fp32 on CPU), bfloat16, float16, float32.")]
BatchSize = Annotated[str, typer.Option("--batch-size", "-b", help="Pages decoded together: a number, or auto (as many as fit in free GPU memory, up to 64; 4 on CPU).")]
MaxNewTokens = Annotated[Optional[int], typer.Option(min=1, help="Token budget per page; a page that hits it is marked truncated. [default: 3072 for ocr/md, 128 for ground]")]
Pages = Annotated[Optional[str], typer.Option("--pages", "-p", help="Pages to process in every document, 1-based: 1-3,7 or 5- or -2.")]
Dpi = Annotated[float, typer.Option(min=36, max=1200, help="PDF rendering resolution. 200 dpi puts a letter page at 1700x2200 px, about twice the ~1 MP grid Kosmos-2.5 reads.")]
Password = Annotated[Optional[str], typer.Option(help="Password for encrypted PDFs.")]
Format = Annotated[str, typer.Option("--format", "-f", help="stdout format: text (markdown, OCR lines x0,y0,x1,y0,x1,y1,x0,y1,text, or the caption; a line <!-- SOURCE, page N --> starts each page when the run has several documents or a document several pages) or jsonl (one JSON object per page, failed inputs included).")]
Overlay = Annotated[bool, typer.Option(help="With -o: also write a PNG per page with the boxes drawn.")]
Overwrite = Annotated[bool, typer.Option(help="With -o: redo pages that are already written.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, notes or summary: only errors.")]
Debug = Annotated[bool, typer.Option(help="Show Python tracebacks for errors.")]
Compile = Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="Compile the decode step with torch.compile (CUDA graphs on a GPU). KOSMOS_ATTENTION=auto|sdpa|flex picks its attention kernel (see README). [default: on for CUDA, off for CPU, where compiling takes a minute]")]


@app.command("ocr")
def ocr(inputs: Inputs, output: Output = None, model: Model = None, device: Device = "auto", dtype: DType = "auto",
        batch_size: BatchSize = "auto", max_new_tokens: MaxNewTokens = None, pages: Pages = None,
        dpi: Dpi = documents.DEFAULT_DPI, password: Password = None, format: Format = "text", overlay: Overlay = False,
        overwrite: Overwrite = False, quiet: Quiet = False, debug: Debug = False, compile: Compile = None) -> None:
    """Kosmos-2.5 OCR: text lines with 8-point polygons (x0,y0,x1,y0,x1,y1,x0,y1) in page pixels."""
    _command("ocr", **locals())


@app.command("md")
def md(inputs: Inputs, output: Output = None, model: Model = None, device: Device = "auto", dtype: DType = "auto",
       batch_size: BatchSize = "auto", max_new_tokens: MaxNewTokens = None, pages: Pages = None,
       dpi: Dpi = documents.DEFAULT_DPI, password: Password = None, format: Format = "text", overlay: Overlay = False,
       overwrite: Overwrite = False, quiet: Quiet = False, debug: Debug = False, compile: Compile = None,
       ask: Annotated[Optional[str], typer.Option("--ask", help="Ask a question about each page with microsoft/kosmos-2.5-chat (the default model then).")] = None) -> None:
    """Kosmos-2.5 markdown of each page (or answers with --ask)."""
    _command("md", **locals())


@app.command("ground")
def ground(inputs: GroundInputs, output: Output = None, model: Model = None, device: Device = "auto",
           dtype: DType = "auto", batch_size: BatchSize = "auto", max_new_tokens: MaxNewTokens = None,
           pages: Pages = None, dpi: Dpi = documents.DEFAULT_DPI, password: Password = None, format: Format = "text",
           overlay: Overlay = False, overwrite: Overwrite = False, quiet: Quiet = False, debug: Debug = False,
           compile: Compile = None,
           prompt: Annotated[Optional[str], typer.Option("--prompt", help="Prompt to ground, e.g. \"<grounding> An image of\" or \"<grounding><phrase> a dog</phrase>\".")] = None) -> None:
    """Kosmos-2 grounded caption of each image: caption, phrases and their boxes."""
    if inputs[-1].startswith("<"):  # PROMPT_RULE: by spelling only, never by the file system
        if prompt is not None:
            _fail_usage(f"two prompts: {inputs[-1]!r} and --prompt {prompt!r} (give one)")
        inputs, prompt = inputs[:-1], inputs[-1]
        if not inputs:
            _fail_usage("no input files given (a last argument that starts with < is the prompt)")
    _command("ground", **locals())


def _fail_usage(message: str) -> None:
    typer.echo(f"kosmos: {message}", err=True)
    raise typer.Exit(2)


def _command(name: str, inputs: list[str], *, prompt: str | None = None, ask: str | None = None, **flags) -> None:
    """Run one command with its arguments (each command passes its own, by name) and exit with its
    code: failures are one line on stderr (tracebacks with --debug)."""
    opts = Options(**flags, attention=os.environ.get("KOSMOS_ATTENTION", "auto"))
    try:
        code = run_command(name, inputs, opts, prompt=prompt, question=ask)
    except (typer.Exit, click.exceptions.ClickException):
        raise
    except KeyboardInterrupt:
        _report("interrupted")
        code = 130
    except BrokenPipeError:  # `kosmos ... | head`: the reader left; stop quietly, as other tools do
        try:  # keep the interpreter's final flush of stdout from failing again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        code = 141
    except Exception as err:  # a bug or an unforeseen failure: one line, the traceback only with --debug
        if opts.debug:
            raise
        _report(f"error: {type(err).__name__}: {err} (run with --debug for the traceback)")
        code = 1
    raise typer.Exit(code)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("kosmos-transcribe")
        except PackageNotFoundError:  # run from a source tree that was never installed
            from . import __version__ as number
        typer.echo(f"kosmos {number}")
        raise typer.Exit()


@app.callback()  # options of `kosmos` itself, before the command
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    pages: int = 0
    failed: int = 0
    skipped: int = 0
    tokens: int = 0
    truncated: int = 0
    failed_inputs: set = field(default_factory=set)


def run_command(task_name: str, inputs: list[str], opts: Options, *, prompt: str | None = None, question: str | None = None) -> int:
    """Run one command; returns the exit code."""
    from .models.layers import ATTENTION_CHOICES
    from .pipeline import TASKS

    task = TASKS[task_name]
    if opts.attention not in ATTENTION_CHOICES:
        _fail_usage(f"KOSMOS_ATTENTION={opts.attention!r}: use one of {', '.join(ATTENTION_CHOICES)}")
    if opts.format not in ("text", "jsonl"):
        _fail_usage(f"--format must be text or jsonl, not {opts.format!r}")
    if (opts.overlay or opts.overwrite) and opts.output is None:
        _fail_usage("--overlay and --overwrite need -o/--output DIR")
    try:
        selection = documents.parse_pages(opts.pages) if opts.pages is not None else None
    except ValueError as err:
        _fail_usage(f"--pages: {err}")
    batch_size = _batch_size(opts.batch_size)
    _check_device(opts.device)
    _check_dtype(opts.dtype)
    if opts.output is not None:
        _check_output(opts.output)
    if question is not None:
        from .processing.kosmos2_5 import chat_prompt

        prompt = chat_prompt(question)
    model_name = opts.model or ("microsoft/kosmos-2.5-chat" if question is not None else task.default_model)

    files, input_errors = documents.collect_inputs(inputs, exclude=[opts.output] if opts.output else ())
    tally = Tally()
    out = None if opts.output is None else writers.OutputDir(opts.output, task.name, model=model_name,
                                                             overwrite=opts.overwrite, warn=_Emitter.note_for(opts))
    emit = _Emitter(out, opts, tally, task.name, model_name, several=len(files) > 1)
    for error in input_errors:
        emit.input_error(error)
    if not files:
        if tally.failed_inputs:
            return 1
        _fail_usage("no supported input files found (PDF, PNG, JPEG, TIFF, WebP, BMP, GIF)")
    skip = (lambda job: out.is_done(job.stem, job.page)) if out is not None else None
    jobs = documents.iter_pages(files, selection, opts.dpi, opts.password, skip=skip)

    show_progress = not opts.quiet and sys.stderr.isatty()
    progress = _Progress(show_progress, _count_pages(files, selection, opts) if show_progress else None, tally)
    prompt = task.prompt if prompt is None else prompt
    started = time.monotonic()
    try:
        with progress:
            for item, result in _process(task, jobs, model_name, opts, batch_size, prompt, progress):
                interrupt.check()
                emit(item, result)
                progress.advance(item, result)
    except KeyboardInterrupt:
        _report("interrupted; finished pages are saved and a re-run with -o continues where it stopped")
        return 130
    except _Fatal as err:
        _report(str(err.__cause__ if opts.debug else err))
        if opts.debug:
            traceback.print_exception(err.__cause__, file=sys.stderr)
        return err.code
    if not opts.quiet:
        _summary(tally, time.monotonic() - started)
    return 1 if tally.failed or tally.failed_inputs else 0


def _check_device(value: str) -> None:
    """Refuse, in our words and before any work, a device this run cannot use."""
    from .engine import pick_device

    try:
        pick_device(value, name="--device")
    except ValueError as err:
        _fail_usage(str(err))


def _check_dtype(value: str) -> None:
    from .engine import DTYPES

    if value != "auto" and value not in DTYPES:
        _fail_usage(f"--dtype must be auto, bfloat16, float16 or float32, not {value!r}")


def _check_output(folder: Path) -> None:
    """Create the -o folder and prove it writable now, not after the model has loaded and a page is done."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".kosmos-probe-")
        os.close(fd)
        os.unlink(probe)
    except (FileExistsError, NotADirectoryError):  # a file (or /dev/null) where the folder should be
        _fail_usage(f"-o {display_path(folder)}: not a directory")
    except OSError as err:
        _fail_usage(f"-o {display_path(folder)}: {_os_reason(err)}")


def _os_reason(err: OSError) -> str:
    """The reason of an OSError, as our messages word it (writers.OutputError carries its own)."""
    if isinstance(err, PermissionError):
        return "permission denied"
    reason = getattr(err, "reason", None) or err.strerror or str(err)
    return reason[:1].lower() + reason[1:]


class _Fatal(Exception):
    """An error that stops the whole run (the model cannot be loaded)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _batch_size(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        _fail_usage(f"--batch-size must be a positive number or auto, not {value!r}")
    return size


def _load_engine(task, model_name: str, opts: Options):
    """Load the model once the first page needs it (a run whose pages are all done loads nothing)."""
    from . import engine as engine_module
    from .models.loading import ModelLoadError

    try:
        engine = engine_module.load(model_name, device=opts.device, dtype=opts.dtype,
                                    compile="auto" if opts.compile is None else opts.compile, attention=opts.attention)
    except (ModelLoadError, ValueError, FileNotFoundError, RuntimeError) as err:
        raise _Fatal(f"cannot load model {model_name}: {err}", 1) from err
    if engine.kind != task.model_kind:
        raise _Fatal(f"`kosmos {task.name}` needs a {task.model_kind} model, but {model_name} is {engine.kind}", 2)
    if not opts.quiet:
        _report(f"running {engine}")
    return engine


def _process(task, jobs, model_name, opts, batch_size, prompt, progress) -> Iterator:
    """(item, result) for every page job, rendering ahead and loading the model lazily."""
    from .pipeline import transcribe

    engine_holder: list = []

    def lazy_engine_items():
        for item in documents.prefetch(jobs, depth=max(4, 2 * (batch_size or 8))):
            interrupt.check()
            if not engine_holder and isinstance(item, PageJob) and not item.skipped:
                engine_holder.append(_load_engine(task, model_name, opts))
                interrupt.check()
            yield item

    items = lazy_engine_items()
    # Items before the first page that needs the model (errors, skipped pages) pass straight through.
    for item in items:
        if engine_holder:
            chained = chain([item], items)
            break
        yield item, None
    else:
        return
    engine = engine_holder[0]
    limit = opts.max_new_tokens or task.max_new_tokens
    size = batch_size or engine.auto_batch_size(prompt, limit)
    yield from transcribe(engine, task, chained, prompt=prompt, batch_size=size, max_new_tokens=limit,
                          on_page=progress.page_done)


class _Emitter:
    """Writes each item's outcome: results to stdout or under -o, errors and notes on stderr (and,
    with --format jsonl on stdout, failures as records whose `error` is set, page 0 for a whole input)."""

    def __init__(self, out, opts: Options, tally: Tally, task: str, model: str, *, several: bool):
        self.out, self.opts, self.tally, self.task, self.model = out, opts, tally, task, model
        self.several = several  # more than one document: mark each one's start on stdout
        self.unwritable: set[str] = set()  # stems whose -o write failed; the rest of the document is dropped

    def input_error(self, error) -> None:
        where = display_path(error.path)
        if getattr(error, "warning", False):
            self._note(f"{where}: {error.reason}")
            return
        _report(f"{where}: {error.reason}")
        self.tally.failed_inputs.add(str(error.path))
        self._record(error.path, 0, error.reason)

    def __call__(self, item, result) -> None:
        if isinstance(item, ErrorJob):
            result = self._failure(item)
            if result is None:
                return
        elif item.skipped:
            self.tally.skipped += 1
        elif result is not None:
            self._result(item, result)
        for note in item.notes if isinstance(item, PageJob) else ():
            self._note(f"{display_path(item.source)}: page {item.page}: {note}")
        if self.out is not None:
            self._store(item, result)
        if isinstance(item, PageJob):
            item.image = None  # the page is done: let its pixels go

    def _failure(self, item: ErrorJob):
        """Report a failed document or page; a failed page's placeholder result, to be stored under -o."""
        where = display_path(item.source) + (f": page {item.page}" if item.page is not None else "")
        if item.warning:
            self._note(f"{where}: {item.error}")
            return None
        _report(f"{where}: {item.error}")
        self.tally.failed += 1
        self.tally.failed_inputs.add(str(item.source))
        self._record(item.source, item.page or 0, item.error)
        if item.page is None:
            return None
        return writers.PageResult.failed(item.source, item.page, self.task, self.model, item.error)

    def _result(self, item: PageJob, result) -> None:
        self.tally.pages += 1
        self.tally.truncated += result.truncated
        if result.error:
            _report(f"{display_path(item.source)}: page {item.page}: {result.error}")
            self.tally.failed += 1
        if self.out is None:
            sys.stdout.write(writers.format_jsonl(result) + "\n" if self.opts.format == "jsonl"
                             else _text_block(item, result, self.several))
            sys.stdout.flush()

    def _store(self, item, result) -> None:
        """Store a page under -o, and its document once the last selected page is in. A failed write
        (disk full, a name the file system refuses) fails this document only."""
        if item.stem in self.unwritable:
            return
        try:
            if result is not None:
                self.out.write_page(item.stem, result)
                if self.opts.overlay and not result.error:
                    self.out.write_overlay(item.stem, item.page, writers.draw_overlay(item.image, result))
            if item.is_last:
                self.out.assemble(item.stem, item.selected)
        except OSError as err:
            self.unwritable.add(item.stem)
            self.tally.failed_inputs.add(str(item.source))
            target = getattr(err, "path", None) or err.filename
            what = f"cannot write {display_path(target)}" if target else "cannot write its output"
            _report(f"{display_path(item.source)}: {what}: {_os_reason(err)}")

    def _record(self, source, page: int, error: str) -> None:
        if self.out is None and self.opts.format == "jsonl":
            failed = writers.PageResult.failed(source, page, self.task, self.model, error)
            sys.stdout.write(writers.format_jsonl(failed) + "\n")
            sys.stdout.flush()

    def _note(self, message: str) -> None:
        self.note_for(self.opts)(message)

    @staticmethod
    def note_for(opts: Options):
        """How notes are reported: on stderr unless --quiet."""
        return (lambda message: None) if opts.quiet else (lambda message: _report(message, note=True))


def _text_block(item: PageJob, result, several: bool) -> str:
    body = writers.format_text(result)
    marked = several or len(item.selected) > 1 or item.page != 1
    header = writers.page_comment(item.page, source=display_path(item.source)) + "\n" if marked else ""
    return header + body.rstrip("\n") + "\n"


def _report(message: str, note: bool = False) -> None:
    sys.stderr.write(f"kosmos: {'note: ' if note else ''}{message}\n")


def _count_pages(files, selection, opts: Options) -> int:
    """Total selected pages, for the progress bar's ETA (documents are only opened, not rendered)."""
    total = 0
    for f in files:
        try:
            with documents.open_document(f.path, opts.dpi, opts.password) as doc:
                total += len(selection.select(doc.num_pages)[0]) if selection else doc.num_pages
        except documents.DocumentError:
            continue
    return total


def _summary(tally: Tally, seconds: float) -> None:
    rate = f"{tally.pages / seconds:.2f} pages/s, {tally.tokens / seconds:.0f} tokens/s" if seconds > 0 else ""
    parts = [f"{tally.pages} page{'s' * (tally.pages != 1)} in {seconds:.1f}s ({rate})"]
    if tally.truncated:
        parts.append(f"{tally.truncated} truncated")
    if tally.skipped:
        parts.append(f"{tally.skipped} already done")
    if tally.failed:
        parts.append(f"{tally.failed} failed")
    if tally.failed_inputs:
        parts.append(f"problems in {len(tally.failed_inputs)} input{'s' * (len(tally.failed_inputs) != 1)}")
    _report("; ".join(parts))


class _Progress:
    """A rich progress bar on stderr (pages, pages/s, tokens/s, ETA), only when stderr is a terminal."""

    def __init__(self, enabled: bool, total: int | None, tally: Tally):
        self.enabled, self.total, self.tally = enabled, total, tally
        self.started = time.monotonic()
        self.bar = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=True,
                                # Results must stay on stdout; rich would route them to its console.
                                redirect_stdout=False)
            self.bar.__enter__()
            self.task = self.bar.add_task("pages", total=self.total, rate="")
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def page_done(self, result, new_tokens: int) -> None:
        self.tally.tokens += new_tokens

    def advance(self, item, result) -> None:
        if self.bar is None or isinstance(item, ErrorJob):
            return
        elapsed = max(time.monotonic() - self.started, 1e-9)
        done = self.bar.tasks[0].completed + 1
        self.bar.update(self.task, advance=1, rate=f"{done / elapsed:.2f} pages/s, {self.tally.tokens / elapsed:.0f} tok/s")
