"""From inputs to page results: the one way the command (and Python users) reach the engine.

    import kosmos_cli
    for result in kosmos_cli.transcribe(["scans/"], "md", pages="1-3"):
        print(result.source, result.page, result.confidence, result.text)

`transcribe` finds the inputs, lists their pages and runs them where `Settings` says: one device in
this process, one worker process a device (`distributed.local`), or a Ray actor pool
(`distributed.ray_data`). `run_pages` is the same run over pages already listed, with the items the
command needs (their stems, the pages skipped as done, the rendered images for overlays).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from . import interrupt
from .documents import DEFAULT_DPI
from .inputs import PageSelection, collect_inputs, parse_pages
from .pages import ErrorJob, PageJob, iter_pages
from .results import PageResult
from .tasks import Task, WrongModel, find_task

__all__ = ["ModelUnusable", "Settings", "load_engine", "load_for_serving", "renders_here", "run_pages", "transcribe"]


class ModelUnusable(Exception):
    """The model cannot run this task: it does not load (``code`` 1) or is of another architecture
    than the task needs (``code`` 2, a usage error); the message says which, in the command's words."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass
class Settings:
    """How a run is done. ``model`` None: the task's default (the chat model when ``prompt`` is a
    chat question). ``device``: "auto", "cpu", "cuda", "cuda:N", a comma list or "all"
    (`engine.pick_devices`); ``ray``: on a Ray cluster (``ray_address``, else RAY_ADDRESS or a local
    one), one actor per cluster GPU or, without GPUs, one per device listed. ``batch_size`` None: as
    many as fit. ``keep_images``: page results keep their rendered images (overlays)."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    compile: bool | str = "auto"
    attention: str = "auto"
    batch_size: int | None = None
    max_new_tokens: int | None = None
    dpi: float = DEFAULT_DPI
    password: str | None = None
    prompt: str | None = None
    ray: bool = False
    ray_address: str | None = None
    keep_images: bool = False
    server: str | None = None  # a `kosmos serve` URL: the model work is done there (kosmos_cli.client)
    api_key: str | None = None  # the server's key
    question: str | None = None  # for the server: the chat question ``prompt`` was made from

    def model_for(self, task: Task) -> str:
        return self.model or task.default_model


def transcribe(inputs: Iterable[str | os.PathLike], task: str = "ocr", *, pages: str | PageSelection | None = None,
               **settings: Any) -> Iterator[PageResult]:
    """Every selected page of ``inputs`` (files, folders searched recursively, globs) as a page result,
    in input order; an input that cannot be found or read is one result with ``error`` set (page 0),
    as is a page that fails. ``pages``: "1-3,7" or a `PageSelection`; ``settings``: `Settings`' fields.
    Raises `ModelUnusable`, ValueError for a bad setting, and `WorkersLost` when every worker is gone."""
    task_record = find_task(task)
    options = Settings(**settings)
    selection = parse_pages(pages) if isinstance(pages, str) else pages
    files, errors = collect_inputs([os.fspath(i) for i in inputs])
    model = options.model_for(task_record)
    for error in errors:
        if not error.warning:
            yield PageResult.failed(error.path, 0, task_record.name, model, error.reason)
    items = iter_pages(files, selection, options.dpi, options.password, render=renders_here(options))
    for item, result in run_pages(task_record, items, options):
        if isinstance(item, ErrorJob):
            if not item.warning:  # a note (an XFA form's, say) is not a failure
                yield PageResult.failed(item.source, item.page or 0, task_record.name, model, item.error)
        elif result is not None:
            yield result


def run_pages(task: Task, items: Iterable[PageJob | ErrorJob], settings: Settings, *,
              on_page: Callable[..., None] | None = None, log: Callable[[str], None] | None = None,
              ) -> Iterator[tuple[PageJob | ErrorJob, PageResult | None]]:
    """Run the task on listed pages (`pages.iter_pages`; render them here only for one device:
    `renders_here`) where ``settings`` says, yielding (item, result) in input order; error items and
    pages skipped as done come out with result None. ``on_page(result, new_tokens[, device])`` as
    each page finishes, ``log`` for what is worth saying (the engine loaded, the workers)."""
    from .engine import pick_devices
    from .pipeline import transcribe as pages_through

    model = settings.model_for(task)
    if settings.server is not None:
        from .client import remote_pages

        return remote_pages(task, items, url=settings.server, api_key=settings.api_key, model=model,
                            prompt=settings.prompt, question=settings.question, dpi=settings.dpi,
                            password=settings.password, max_new_tokens=settings.max_new_tokens,
                            render_images=settings.keep_images, on_page=on_page)
    devices = pick_devices(settings.device, name="--device")
    options = dict(prompt=settings.prompt, batch_size=settings.batch_size)
    if settings.ray:
        return _on_ray(devices, task, model, items, settings, on_page, log, **options)
    if len(devices) > 1:
        return _on_devices(devices, task, model, items, settings, on_page, log, **options)
    return pages_through(lambda: load_engine(model, settings, task=task, log=log), task, items,
                         max_new_tokens=settings.max_new_tokens, on_page=on_page, **options)


def renders_here(settings: Settings) -> bool:
    """Whether pages are rendered in this process (one device, or a server's client that draws
    overlays) or by the workers or the server that run them."""
    from .engine import pick_devices

    if settings.server is not None:
        return settings.keep_images
    return not settings.ray and len(pick_devices(settings.device, name="--device")) == 1


def engine_spec(model: str, settings: Settings, device: str):
    """How an engine of this run is loaded (here, in a worker process or in a Ray actor)."""
    from .distributed.worker import EngineSpec

    return EngineSpec(model, device, settings.dtype, settings.compile, settings.attention)


def load_engine(model: str, settings: Settings, *, task: Task | None = None, log: Callable[[str], None] | None = None):
    """Load the model on ``settings.device`` (a run does it once the first page needs it, so that a
    run whose pages are all done loads nothing); `ModelUnusable` if it does not load or cannot do
    ``task``; ``log`` hears what runs where."""
    with _loading(model):
        engine = engine_spec(model, settings, settings.device).load()
    interrupt.check()
    try:
        if task is not None:
            task.check_model(engine.kind, model)
    except WrongModel as err:
        raise ModelUnusable(str(err), 2) from None
    if log is not None:
        log(f"running {engine}")
    return engine


def load_for_serving(model: str, settings: Settings, devices: list[str], *, log: Callable[[str], None] | None = None):
    """What `kosmos serve` needs loaded here: on one device its engine (`load_engine`) and no workers;
    on several, only the model's `Checkpoint` (to count prompt tokens) and one worker's `EngineSpec` a
    device (`distributed.pool` loads them). `ModelUnusable` as `load_engine`."""
    from .engine import describe

    if len(devices) == 1:
        return load_engine(model, dataclasses.replace(settings, device=devices[0]), log=log), None
    with _loading(model):
        checkpoint = describe(model)
    return checkpoint, [engine_spec(model, settings, device) for device in devices]


@contextlib.contextmanager
def _loading(model: str):
    """A model that cannot be read or loaded is `ModelUnusable` (exit 1), in the command's words."""
    try:
        yield
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # ModelLoadError is a ValueError too
        raise ModelUnusable(f"cannot load model {model}: {err}", 1) from err


def _on_devices(devices, task: Task, model: str, items, settings: Settings, on_page, log, **options):
    """One worker process a device (`kosmos_cli.distributed.local`)."""
    from .distributed.local import transcribe_on_devices

    specs = [engine_spec(model, settings, str(device)) for device in devices]
    return transcribe_on_devices(specs, task.name, items, dpi=settings.dpi, password=settings.password,
                                 max_new_tokens=settings.max_new_tokens, keep_images=settings.keep_images,
                                 on_page=on_page, log=log, **options)


def _on_ray(devices, task: Task, model: str, items, settings: Settings, on_page, log, **options):
    """A Ray actor pool (`kosmos_cli.distributed.ray_data`): one actor per GPU of the cluster, or per
    device listed on a cluster without GPUs."""
    import ray

    from .distributed.ray_data import connect, transcribe_on_ray

    connect(settings.ray_address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = gpus or len(devices)
    if log is not None:
        log(f"running on Ray: {actors} {'GPU' if gpus else 'CPU'} actor{'s' * (actors != 1)}")
    return transcribe_on_ray(engine_spec(model, settings, "cuda" if gpus else "cpu"), actors, task.name, items,
                             dpi=settings.dpi, password=settings.password, gpus=gpus > 0,
                             max_new_tokens=settings.max_new_tokens, keep_images=settings.keep_images,
                             on_page=on_page, **options)
