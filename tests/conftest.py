"""Shared fixtures: tiny random checkpoints in the Hub layout (built once per test run, whatever the
number of pytest-xdist workers), our model on one of them, an input image, fixed model answers; and how
a run with workers (`-n auto`) shares out the cores."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers.images import write_image
from tests.helpers.kosmos2 import SNOWMAN, make_kosmos2_checkpoint
from tests.helpers.kosmos2_5 import make_kosmos2_5_checkpoint

# --------------------------------------------------------------------------------------------------
# Checkpoints, built once per run
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def build_once(pytestconfig, tmp_path_factory):
    """`build_once(name, build)` calls `build(folder)` once per test run and returns the folder. Without
    workers that is once per session; under pytest-xdist each worker is a session of its own, so the
    first worker to ask builds in the run's folder (the parent of every worker's basetemp) while the
    others wait on a lock, and all of them read the same files."""

    def build_once(name: str, build) -> Path:
        if not _in_a_worker(pytestconfig):
            return build(tmp_path_factory.mktemp(name))
        run = tmp_path_factory.getbasetemp().parent
        path, done = run / name, run / f"{name}.done"
        with open(run / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not done.exists():
                shutil.rmtree(path, ignore_errors=True)  # what a worker that died mid-build left
                build(path)
                done.touch()
        return path

    return build_once


# --------------------------------------------------------------------------------------------------
# Kosmos-2.5
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kosmos25_tied(build_once):
    """Tiny Kosmos-2.5: tied lm_head (absent from the file), one model.safetensors, preprocessor_config.json."""
    return build_once("kosmos25_tied", lambda path: make_kosmos2_5_checkpoint(
        path, tied=True, sharded=False, image_dependent=False))


@pytest.fixture(scope="session")
def kosmos25_sharded(build_once):
    """Tiny Kosmos-2.5: untied lm_head, >= 2 safetensors shards + index; greedy output depends on the image."""
    return build_once("kosmos25_sharded", lambda path: make_kosmos2_5_checkpoint(
        path, tied=False, sharded=True, image_dependent=True))


@pytest.fixture(scope="session")
def kosmos25_processor_layout(build_once):
    """Like `kosmos25_tied` but with transformers-5's processor_config.json instead of preprocessor_config.json."""
    return build_once("kosmos25_processor_layout", lambda path: make_kosmos2_5_checkpoint(
        path, tied=True, sharded=False, image_dependent=False, processor_layout="processor"))


@pytest.fixture(scope="session")
def k25(kosmos25_tied) -> str:
    """The tiny Kosmos-2.5 checkpoint as the CLI's --model argument."""
    return str(kosmos25_tied)


@pytest.fixture(scope="module")
def engine(kosmos25_sharded):
    """Our model on `kosmos25_sharded`, CPU, fp32: one per test module, as tests change its state."""
    import kosmos_cli

    return kosmos_cli.load(kosmos25_sharded, device="cpu", dtype="float32")


# --------------------------------------------------------------------------------------------------
# Kosmos-2
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def scripted(build_once):
    """Tiny Kosmos-2.5 that writes a known three-line OCR transcript (tests/helpers/scripted.py)."""
    from tests.helpers.scripted import STRENGTHS, TRANSCRIPT, make_scripted_checkpoint

    return build_once("scripted", lambda path: make_scripted_checkpoint(path, TRANSCRIPT, STRENGTHS))


@pytest.fixture(scope="session")
def k2_dir(build_once):
    """Tiny Kosmos-2 (seed 0): untied lm_head, greedy output depends on the image; tokenizer_config.json
    without an added_tokens_decoder block."""
    return build_once("kosmos2", make_kosmos2_checkpoint)


@pytest.fixture(scope="session")
def k2(k2_dir) -> str:
    """The tiny Kosmos-2 checkpoint as the CLI's --model argument."""
    return str(k2_dir)


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def png(tmp_path):
    """A white 64×48 PNG."""
    return write_image(tmp_path / "good.png")


@pytest.fixture(scope="session")
def alto_schema():
    """The official ALTO 4.4 schema (tests/helpers/validators.py)."""
    from tests.helpers.validators import load_alto_schema

    return load_alto_schema()


# --------------------------------------------------------------------------------------------------
# Model answers
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def fixed_answers(monkeypatch):
    """Replace the model's raw text by a fixed answer before parsing (OCR lines, grounded entities).

    The answer's coordinates are computed from the model-space size the pipeline passes in, so the
    scaling to page pixels and the clipping are the real ones; one OCR box runs past the image edge."""
    from kosmos_cli.tasks import TASKS
    from kosmos_cli.tasks import grounding, ocr

    def ocr_fields(raw, model_size, page_size, scores=None):
        w, h = model_size
        answer = (f"<bbox><x_0><y_0><x_{w // 2}><y_{h // 4}></bbox>Total 50,000\n"
                  f"<bbox><x_{w // 4}><y_{h // 2}><x_{w + 40}><y_{h + 40}></bbox>past the edge\n")
        return ocr.page_fields(answer, model_size, page_size)

    def ground_fields(raw, model_size, page_size, scores=None):
        return grounding.page_fields(SNOWMAN, model_size, page_size)

    monkeypatch.setitem(TASKS, "ocr", dataclasses.replace(TASKS["ocr"], parse=ocr_fields))
    monkeypatch.setitem(TASKS, "ground", dataclasses.replace(TASKS["ground"], parse=ground_fields))


# --------------------------------------------------------------------------------------------------
# The run: its compile cache, its workers, markers
# --------------------------------------------------------------------------------------------------


def pytest_configure(config):
    """torch.compile in this run (tests, the processes they start, and pytest-xdist's workers) caches
    into a folder of its own, empty at the start: what a test compiles must not depend on what earlier
    runs left in the machine's shared cache. The main process makes it; workers inherit it through the
    environment. Tests that need a cold cache of their own set TORCHINDUCTOR_CACHE_DIR."""
    if _in_a_worker(config):
        _share_the_cores(config.workerinput["workercount"])
        return
    config.inductor_cache = tempfile.mkdtemp(prefix="kosmos-tests-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = config.inductor_cache


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "inductor_cache", ""), ignore_errors=True)


def _in_a_worker(config) -> bool:
    """A pytest-xdist worker (not a pytest that a test starts in one: it inherits PYTEST_XDIST_WORKER)."""
    return hasattr(config, "workerinput")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _share_the_cores(workers: int) -> None:
    """In a pytest-xdist worker: torch, here and in the processes the tests start, gets this worker's
    share of the cores (one thread each for two workers on 2 cores). Two workers of two threads each
    oversubscribe 2 cores, and torch's threads then wait on each other: a test of many small ops on the
    tiny models went from 0.3 s to 10 s."""
    import torch

    threads = max(1, _cores() // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (the README's test command): two workers where there are two cores or more, none (a
    plain run) on one core. Two is what was measured (on 2 cores); each worker costs a process that
    imports torch and transformers and loads its own engines."""
    return 2 if _cores() >= 2 else 0


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under xdist's default, `--dist load`: the longest tests first, and tests that share something
    costly that lives in one process in one worker (tests/helpers/schedule.py). Another `--dist`
    (loadfile, worksteal, ...) gets xdist's own scheduling."""
    if config.getvalue("dist") != "load":
        return None
    from tests.helpers.schedule import LongestFirst

    return LongestFirst(config, log)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is available (the parity suite on the GPU)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
