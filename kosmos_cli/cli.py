"""The `kosmos` command: thin Typer layer (flags -> library calls -> exit code).

Exit codes: 0 every page done; 1 some inputs or pages failed (each named on stderr, the rest still
written); 2 usage error (bad flag, nothing to do); 130 interrupted; 141 stdout closed by its reader."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from . import documents, interrupt
from .distributed.processes import WorkersLost
from .inputs import collect_inputs, parse_pages
from .pages import PageJob, iter_pages
from .paths import display_path, os_reason
from .report import Progress, Report, library_output_held, say
from .results import PageResult
from .review import Review, parse_threshold
from .runner import ModelUnusable, Settings, load_for_serving, renders_here, run_pages
from .tasks import TASKS, tasks_for
from .writers.atomic import check_writable
from .writers.directory import OutputDir
from .writers.formats import choose_documents
from .writers.sinks import DirectorySink, JsonlSink, TextSink


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Transcribe documents with Kosmos-2.5 (markdown, OCR lines with polygons) and ground captions "
    "with Kosmos-2. Results go to stdout (or to files with -o); progress and errors go to stderr.",
)

# What `--outputs pdf` and `--ray` need, as pyproject.toml's extras pin it (a test holds the two together).
# The hints name these packages, which pip installs however kosmos was installed; our distribution's
# name with an extra would not do: it is not on PyPI, and whoever took the name there would be installed.
PDF_REQUIREMENT = "pikepdf>=10"
RAY_REQUIREMENT = "ray[data]>=2.60,<2.61"

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
    outputs: Optional[str] = None
    overwrite: bool = False
    review_below: Optional[str] = None  # P, checked by run_command (review.parse_threshold)
    quiet: bool = False
    debug: bool = False
    compile: Optional[bool] = None
    ray: bool = False
    ray_address: Optional[str] = None
    server: Optional[str] = None
    api_key: Optional[str] = None
    attention: str = "auto"  # from KOSMOS_ATTENTION, not a flag: a setting for experiments (see README)


# One alias per shared flag; each command below lists them, so a flag can be grepped to its command.
Inputs = Annotated[list[str], typer.Argument(help=INPUTS_HELP, show_default=False)]
GroundInputs = Annotated[list[str], typer.Argument(help=INPUTS_HELP + " " + PROMPT_RULE, show_default=False)]
Output = Annotated[Optional[Path], typer.Option("--output", "-o", help="Write files under this directory (mirrors input subfolders) instead of stdout; re-runs skip finished pages.")]
Model = Annotated[Optional[str], typer.Option("--model", "-m", help="Hugging Face repo id or local checkpoint directory. [default: microsoft/kosmos-2.5 for ocr/md, microsoft/kosmos-2-patch14-224 for ground]")]
Device = Annotated[str, typer.Option(help="auto (every visible GPU when there are several, one worker process each; the GPU when there is one; else the CPU), all (every visible GPU), cpu, cuda, cuda:N, or a list: cuda:0,cuda:2.")]
DType = Annotated[str, typer.Option(help="auto (bf16 on Ampere and newer GPUs, fp16 on older ones, fp32 on CPU), bfloat16, float16, float32.")]
BatchSize = Annotated[str, typer.Option("--batch-size", "-b", help="Pages decoded together: a number, or auto (as many as fit in free GPU memory, up to 64; 4 on CPU).")]
MaxNewTokens = Annotated[Optional[int], typer.Option(min=1, help="Token budget per page; a page that hits it is marked truncated. [default: 3072 for ocr/md, 128 for ground]")]
Pages = Annotated[Optional[str], typer.Option("--pages", "-p", help="Pages to process in every document, 1-based: 1-3,7 or 5- or -2.")]
Dpi = Annotated[float, typer.Option(min=36, max=1200, help="PDF rendering resolution. 200 dpi puts a letter page at 1700x2200 px, about twice the ~1 MP grid Kosmos-2.5 reads.")]
Password = Annotated[Optional[str], typer.Option(help="Password for encrypted PDFs.")]
Format = Annotated[str, typer.Option("--format", "-f", help="stdout format: text (markdown, OCR lines x0,y0,x1,y0,x1,y1,x0,y1,text, or the caption; a line <!-- SOURCE, page N --> starts each page when the run has several documents or a document several pages) or jsonl (one JSON object per page, failed inputs included).")]
Overlay = Annotated[bool, typer.Option(help="With -o: also write a PNG per page with the boxes drawn.")]
Outputs = Annotated[Optional[str], typer.Option(help="With -o: the document files to write, a comma list: for ocr any of txt,json,pdf,hocr,alto (pdf: a searchable PDF, the input's pages or images with the OCR text as an invisible, selectable layer, needs the pdf extra; hOCR 1.2 <stem>.hocr, ALTO 4.4 <stem>.alto.xml, word boxes estimated from line boxes); md writes md, ground txt,json. A re-run that adds one builds it from the finished pages. [default: txt,json for ocr and ground, md for md]", show_default=False)]
Overwrite = Annotated[bool, typer.Option(help="With -o: redo pages that are already written.")]
ReviewBelow = Annotated[Optional[str], typer.Option("--review-below", metavar="P", show_default=False, help="List the pages of this run's inputs whose confidence (the geometric mean of the model's token probabilities: a ranking for review, not a calibrated accuracy) is below P (0 to 1), lowest first, on stderr at the end (20 at most; -q hides them). With -o, all of them go to OUT/<task>.review.tsv, rewritten from the stored pages at every run given the flag; a run without it leaves that file as it is.")]
Server = Annotated[Optional[str], typer.Option("--server", metavar="URL", help="Let a `kosmos serve` at URL (e.g. http://gpu-box:8000) do the model work: the same outputs, resume and exit codes; the records name the server's model.")]
ApiKey = Annotated[Optional[str], typer.Option(envvar="KOSMOS_API_KEY", show_envvar=True, help="With --server: the server's API key.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, notes or summary: only errors.")]
Debug = Annotated[bool, typer.Option(help="Show Python tracebacks for errors.")]
Ray = Annotated[bool, typer.Option("--ray", help=f"Run on a Ray cluster (pip install \"{RAY_REQUIREMENT}\"): the one at --ray-address or RAY_ADDRESS, else a local one; one actor per cluster GPU (with none: one per --device entry). The files are written here, as without --ray.")]
RayAddress = Annotated[Optional[str], typer.Option("--ray-address", help="With --ray: the cluster to join, e.g. ray://head:10001.")]
Compile = Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="Compile the decode step with torch.compile (CUDA graphs on a GPU). KOSMOS_ATTENTION=auto|sdpa|flex picks its attention kernel (see README). [default: on for CUDA, off for CPU, where compiling takes a minute]")]


@app.command("ocr")
def ocr(inputs: Inputs, output: Output = None, model: Model = None, device: Device = "auto", dtype: DType = "auto",
        batch_size: BatchSize = "auto", max_new_tokens: MaxNewTokens = None, pages: Pages = None,
        dpi: Dpi = documents.DEFAULT_DPI, password: Password = None, format: Format = "text", overlay: Overlay = False,
        outputs: Outputs = None, overwrite: Overwrite = False, review_below: ReviewBelow = None, server: Server = None, api_key: ApiKey = None, quiet: Quiet = False,
        debug: Debug = False, compile: Compile = None, ray: Ray = False, ray_address: RayAddress = None) -> None:
    """Kosmos-2.5 OCR: text lines with 8-point polygons (x0,y0,x1,y0,x1,y1,x0,y1) in page pixels."""
    _command("ocr", **locals())


@app.command("md")
def md(inputs: Inputs, output: Output = None, model: Model = None, device: Device = "auto", dtype: DType = "auto",
       batch_size: BatchSize = "auto", max_new_tokens: MaxNewTokens = None, pages: Pages = None,
       dpi: Dpi = documents.DEFAULT_DPI, password: Password = None, format: Format = "text", overlay: Overlay = False,
       outputs: Outputs = None, overwrite: Overwrite = False, review_below: ReviewBelow = None, server: Server = None, api_key: ApiKey = None, quiet: Quiet = False,
       debug: Debug = False, compile: Compile = None, ray: Ray = False, ray_address: RayAddress = None,
       ask: Annotated[Optional[str], typer.Option("--ask", help="Ask a question about each page with microsoft/kosmos-2.5-chat (the default model then).")] = None) -> None:
    """Kosmos-2.5 markdown of each page (or answers with --ask)."""
    _command("md", **locals())


@app.command("ground")
def ground(inputs: GroundInputs, output: Output = None, model: Model = None, device: Device = "auto",
           dtype: DType = "auto", batch_size: BatchSize = "auto", max_new_tokens: MaxNewTokens = None,
           pages: Pages = None, dpi: Dpi = documents.DEFAULT_DPI, password: Password = None, format: Format = "text",
           overlay: Overlay = False, outputs: Outputs = None, overwrite: Overwrite = False,
           review_below: ReviewBelow = None, server: Server = None, api_key: ApiKey = None, quiet: Quiet = False, debug: Debug = False, compile: Compile = None,
           ray: Ray = False, ray_address: RayAddress = None,
           prompt: Annotated[Optional[str], typer.Option("--prompt", help="Prompt to ground, e.g. \"<grounding> An image of\" or \"<grounding><phrase> a dog</phrase>\".")] = None) -> None:
    """Kosmos-2 grounded caption of each image: caption, phrases and their boxes."""
    if inputs[-1].startswith("<"):  # PROMPT_RULE: by spelling only, never by the file system
        if prompt is not None:
            _fail_usage(f"two prompts: {inputs[-1]!r} and --prompt {prompt!r} (give one)")
        inputs, prompt = inputs[:-1], inputs[-1]
        if not inputs:
            _fail_usage("no input files given (a last argument that starts with < is the prompt)")
    _command("ground", **locals())


@app.command()
def serve(model: Annotated[str, typer.Option("--model", "-m", help="Hugging Face repo id or local checkpoint directory.")] = "microsoft/kosmos-2.5",
          device: Annotated[str, typer.Option(help="auto (the GPU when there is one, else the CPU), cpu, cuda, cuda:N, a comma list (cuda:0,cuda:1) or all: several devices run one worker process each.")] = "auto",
          dtype: DType = "auto",
          host: Annotated[str, typer.Option(help="Address to listen on; beyond loopback, set an API key and put a TLS proxy in front.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
          api_key: Annotated[Optional[str], typer.Option(envvar="KOSMOS_API_KEY", show_envvar=True, help="Every API route then needs Authorization: Bearer KEY (/health does not).")] = None,
          batch_size: BatchSize = "auto", max_new_tokens: MaxNewTokens = None,
          dpi: Annotated[float, typer.Option(min=36, max=1200, help="Default PDF rendering resolution (a request may ask for another).")] = documents.DEFAULT_DPI,
          max_upload_mb: Annotated[float, typer.Option(min=0.001, help="Largest upload, in MiB: past it, 413.")] = 100,
          max_pages: Annotated[int, typer.Option(min=1, help="Most pages one request may have: past it, 413.")] = 1000,
          max_queue: Annotated[int, typer.Option(min=1, help="Requests that may wait for their pages to be queued: past it, 429 with Retry-After.")] = 64,
          keep_results: Annotated[float, typer.Option(min=0, metavar="MINUTES", help="Keep each finished request's upload and records this long, for GET /v1/results/ID (records, document files, pages); 0: keep nothing.")] = 10,
          keep_results_mb: Annotated[float, typer.Option(min=0, help="The most the kept results may take, in MiB; the oldest go first.")] = 1024,
          cors_origin: Annotated[Optional[str], typer.Option(metavar="ORIGIN", help="Let pages of this one origin (e.g. https://app.example.org) call the API from a browser; none by default.")] = None,
          grace: Annotated[float, typer.Option(min=0, help="Seconds running requests get to finish on SIGTERM or Ctrl-C.")] = 30,
          compile: Compile = None, quiet: Quiet = False, debug: Debug = False) -> None:
    """Keep one model warm for many clients: an HTTP API that answers a PDF or image with one JSON record a page (docs at /docs), and a page at / to look at the results."""
    from .server import SERVE_REQUIREMENTS

    missing = [name for name in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(name) is None]
    if missing:
        _fail_usage(f"kosmos serve needs the server's libraries: pip install {' '.join(SERVE_REQUIREMENTS)}")
    from .engine import pick_devices
    from .pipeline import slots_for

    try:
        devices = [str(d) for d in pick_devices(device, "--device")]
    except ValueError as err:
        _fail_usage(str(err))
    _check_dtype(dtype)
    slots = _batch_size(batch_size)
    settings = Settings(model=model, dtype=dtype, compile="auto" if compile is None else compile,
                        attention=os.environ.get("KOSMOS_ATTENTION", "auto"))
    with library_output_held():
        try:
            engine, workers = load_for_serving(model, settings, devices, log=None if quiet else say)
        except ModelUnusable as err:
            say(str(err))
            if debug:
                traceback.print_exception(err.__cause__, file=sys.stderr)
            raise typer.Exit(err.code)
    if slots is None and workers is None:
        slots = slots_for(engine, tasks_for(engine.kind)[0], None, None, max_new_tokens)
    from .server import serve as run_server

    raise typer.Exit(run_server(engine, host=host, port=port, api_key=api_key, slots=slots,
                                max_new_tokens=max_new_tokens, dpi=dpi, max_upload_bytes=int(max_upload_mb * 2**20),
                                max_pages=max_pages, max_queue=max_queue, keep_minutes=keep_results,
                                keep_bytes=int(keep_results_mb * 2**20), cors_origin=cors_origin, grace=grace,
                                quiet=quiet, workers=workers))


def _fail_usage(message: str) -> None:
    typer.echo(f"kosmos: {message}", err=True)
    raise typer.Exit(2)


def _command(name: str, inputs: list[str], *, prompt: str | None = None, ask: str | None = None, **flags) -> None:
    """Run one command with its arguments (each command passes its own, by name) and exit with its
    code: failures are one line on stderr (tracebacks with --debug); the libraries' own output is held
    back (`library_output_held`)."""
    opts = Options(**flags, attention=os.environ.get("KOSMOS_ATTENTION", "auto"))
    try:
        with library_output_held():
            code = run_command(name, inputs, opts, prompt=prompt, question=ask)
    except (typer.Exit, click.exceptions.ClickException):
        raise
    except KeyboardInterrupt:
        say("interrupted")
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
        say(f"error: {type(err).__name__}: {err} (run with --debug for the traceback)")
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


def run_command(task_name: str, inputs: list[str], opts: Options, *, prompt: str | None = None, question: str | None = None) -> int:
    """Run one command; returns the exit code."""
    from .models.layers import ATTENTION_CHOICES

    task = TASKS[task_name]
    if opts.attention not in ATTENTION_CHOICES:
        _fail_usage(f"KOSMOS_ATTENTION={opts.attention!r}: use one of {', '.join(ATTENTION_CHOICES)}")
    if opts.format not in ("text", "jsonl"):
        _fail_usage(f"--format must be text or jsonl, not {opts.format!r}")
    if (opts.overlay or opts.overwrite) and opts.output is None:
        _fail_usage("--overlay and --overwrite need -o/--output DIR")
    if opts.outputs is not None and opts.output is None:
        _fail_usage("--outputs needs -o/--output DIR")
    try:
        document_suffixes = choose_documents(task, opts.outputs) if opts.outputs is not None else None
    except ValueError as err:
        _fail_usage(f"--outputs: {err}")
    if document_suffixes and ".pdf" in document_suffixes and importlib.util.find_spec("pikepdf") is None:
        _fail_usage(f'--outputs pdf needs pikepdf: pip install "{PDF_REQUIREMENT}"')
    try:
        selection = parse_pages(opts.pages) if opts.pages is not None else None
    except ValueError as err:
        _fail_usage(f"--pages: {err}")
    batch_size = _batch_size(opts.batch_size)
    threshold = _review_threshold(opts.review_below)
    _check_device(opts.device)
    if opts.ray_address is not None and not opts.ray:
        _fail_usage("--ray-address needs --ray")
    if opts.ray and importlib.util.find_spec("ray") is None:
        _fail_usage(f'--ray needs Ray: pip install "{RAY_REQUIREMENT}"')
    _check_dtype(opts.dtype)
    if opts.output is not None:
        _check_output(opts.output)
    if question is not None:
        from .processing.kosmos2_5 import chat_prompt

        prompt = chat_prompt(question)
    model_name = opts.model or ("microsoft/kosmos-2.5-chat" if question is not None else task.default_model)
    if opts.server is not None:
        model_name = _check_server(task, opts)

    files, input_errors = collect_inputs(inputs, exclude=[opts.output] if opts.output else ())
    report = Report(task, model_name, quiet=opts.quiet)
    out = None
    if opts.output is not None:
        out = OutputDir(opts.output, task, model=model_name, overwrite=opts.overwrite, warn=report.note,
                        documents=document_suffixes)
        sink = DirectorySink(out, overlay=opts.overlay, password=opts.password, dpi=opts.dpi)
    elif opts.format == "jsonl":
        sink = JsonlSink()
    else:
        sink = TextSink(task, several=len(files) > 1)
    # Every page of the run's inputs goes by the loop below, from one device, local workers or Ray alike;
    # a page skipped as done is read back from its stored record.
    review = Review(threshold, read_back=out.read_page if out is not None else None) if threshold is not None else None
    for error in input_errors:
        _deliver(sink, report, error, report.input_error(error))
    if not files:
        if report.failed_inputs:
            if review is not None:  # no page: an empty list, the old one's file replaced
                _give_review(review, out, opts.quiet)
            return 1
        _fail_usage("no supported input files found (PDF, PNG, JPEG, TIFF, WebP, BMP, GIF)")
    settings = Settings(model=model_name, device=opts.device, dtype=opts.dtype,
                        compile="auto" if opts.compile is None else opts.compile, attention=opts.attention,
                        batch_size=batch_size, max_new_tokens=opts.max_new_tokens, dpi=opts.dpi,
                        password=opts.password, prompt=prompt, ray=opts.ray, ray_address=opts.ray_address,
                        keep_images=opts.overlay, server=opts.server, api_key=opts.api_key, question=question)
    skip = (lambda job: out.is_done(job.stem, job.page)) if out is not None else None
    jobs = iter_pages(files, selection, opts.dpi, opts.password, skip=skip, render=renders_here(settings))
    results = run_pages(task, jobs, settings, on_page=report.page_done, log=None if opts.quiet else say)

    show_progress = not opts.quiet and sys.stderr.isatty()
    progress = Progress(show_progress, _count_pages(files, selection, opts) if show_progress else None, report)
    started = time.monotonic()
    try:
        with progress, contextlib.closing(results):  # closed at once on Ctrl-C: no worker process outlives us
            for item, result in results:
                interrupt.check()
                result = report.account(item, result)
                _deliver(sink, report, item, result)
                if review is not None:
                    review.add(item, result)
                progress.advance(item)
                if isinstance(item, PageJob):
                    item.image = None  # the page is done: let its pixels go
    except KeyboardInterrupt:
        say("interrupted; finished pages are saved and a re-run with -o continues where it stopped")
        return 130
    except WorkersLost as err:
        say(str(err))
        return 2 if err.wrong_model else 1
    except ModelUnusable as err:
        say(str(err.__cause__ if opts.debug else err))
        if opts.debug:
            traceback.print_exception(err.__cause__, file=sys.stderr)
        return err.code
    if not opts.quiet:
        report.summary(time.monotonic() - started)
    code = 1 if report.failed or report.failed_inputs else 0
    if review is not None:
        code = max(code, _give_review(review, out, opts.quiet))
    return code


def _check_server(task, opts: Options) -> str:
    """With --server: the flags that choose how the model runs are the server's; the server must be
    reachable, take the key, and run a model that can do the task (named by --model, if given).
    Returns the server's model name, which the records carry."""
    from .client import ServerUnusable, server_info

    chosen = [flag for flag, value, default in (("--device", opts.device, "auto"), ("--dtype", opts.dtype, "auto"),
                                                ("--batch-size", opts.batch_size, "auto"), ("--compile", opts.compile, None),
                                                ("--ray", opts.ray, False)) if value != default]
    if chosen:
        _fail_usage(f"{', '.join(chosen)} with --server: the server decides how its model runs")
    try:
        info = server_info(opts.server, opts.api_key)
    except ServerUnusable as err:
        say(str(err))
        raise typer.Exit(1)
    if opts.model is not None and opts.model != info["model"]:
        _fail_usage(f"--model {opts.model}: the server at {opts.server} runs {info['model']}")
    if task.name not in info["tasks"]:
        _fail_usage(f"`kosmos {task.name}` needs a {task.model_kind} model, but the server at {opts.server} runs "
                    f"{info['model']} ({info['kind']})")
    return info["model"]


def _give_review(review: Review, out: OutputDir | None, quiet: bool) -> int:
    """The end of a run with --review-below: OUT/<task>.review.tsv written (with -o), then the pages
    named on stderr (unless quiet). Returns 1 if the file could not be written, else 0."""
    tsv = None
    if out is not None:
        try:
            tsv = display_path(out.write_review(review.tsv()))
        except OSError as err:
            say(f"cannot write {display_path(out.review_file)}: {os_reason(err)}")
            return 1
    if not quiet:
        say(review.message(tsv))
    return 0


def _deliver(sink, report: Report, item, result: PageResult | None) -> None:
    """Hand one item to the run's sink; a write that fails fails its document only (stdout closed by
    its reader ends the run: exit 141)."""
    try:
        sink.write(item, result)
    except BrokenPipeError:
        raise
    except OSError as err:
        report.write_failed(item, err)


def _review_threshold(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_threshold(value)
    except ValueError as err:
        _fail_usage(str(err))


def _check_device(value: str) -> list:
    """The run's devices; refuses, in our words and before any work, one this run cannot use."""
    from .engine import pick_devices

    try:
        return pick_devices(value, name="--device")
    except ValueError as err:
        _fail_usage(str(err))


def _check_dtype(value: str) -> None:
    from .engine import DTYPES

    if value != "auto" and value not in DTYPES:
        _fail_usage(f"--dtype must be auto, bfloat16, float16 or float32, not {value!r}")


def _check_output(folder: Path) -> None:
    """Create the -o folder and prove it writable now, not after the model has loaded and a page is done."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        check_writable(folder)
    except (FileExistsError, NotADirectoryError):  # a file (or /dev/null) where the folder should be
        _fail_usage(f"-o {display_path(folder)}: not a directory")
    except OSError as err:
        _fail_usage(f"-o {display_path(folder)}: {os_reason(err)}")


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
