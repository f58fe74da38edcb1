"""Shared fixtures: tiny random checkpoints in the Hub layout (built once per test session), our model
on one of them, an input image, fixed model answers."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import pytest

from tests.helpers.images import write_image
from tests.helpers.kosmos2 import SNOWMAN, make_kosmos2_checkpoint
from tests.helpers.kosmos2_5 import make_kosmos2_5_checkpoint

# --------------------------------------------------------------------------------------------------
# Kosmos-2.5
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kosmos25_tied(tmp_path_factory):
    """Tiny Kosmos-2.5: tied lm_head (absent from the file), one model.safetensors, preprocessor_config.json."""
    path = tmp_path_factory.mktemp("kosmos25_tied")
    return make_kosmos2_5_checkpoint(path, tied=True, sharded=False, image_dependent=False)


@pytest.fixture(scope="session")
def kosmos25_sharded(tmp_path_factory):
    """Tiny Kosmos-2.5: untied lm_head, >= 2 safetensors shards + index; greedy output depends on the image."""
    path = tmp_path_factory.mktemp("kosmos25_sharded")
    return make_kosmos2_5_checkpoint(path, tied=False, sharded=True, image_dependent=True)


@pytest.fixture(scope="session")
def kosmos25_processor_layout(tmp_path_factory):
    """Like `kosmos25_tied` but with transformers-5's processor_config.json instead of preprocessor_config.json."""
    path = tmp_path_factory.mktemp("kosmos25_processor_layout")
    return make_kosmos2_5_checkpoint(
        path, tied=True, sharded=False, image_dependent=False, processor_layout="processor"
    )


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
def k2_dir(tmp_path_factory):
    """Tiny Kosmos-2 (seed 0): untied lm_head, greedy output depends on the image; tokenizer_config.json
    without an added_tokens_decoder block."""
    return make_kosmos2_checkpoint(tmp_path_factory.mktemp("kosmos2"))


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

    def ocr_fields(raw, model_size, page_size):
        w, h = model_size
        answer = (f"<bbox><x_0><y_0><x_{w // 2}><y_{h // 4}></bbox>Total 50,000\n"
                  f"<bbox><x_{w // 4}><y_{h // 2}><x_{w + 40}><y_{h + 40}></bbox>past the edge\n")
        return ocr.page_fields(answer, model_size, page_size)

    def ground_fields(raw, model_size, page_size):
        return grounding.page_fields(SNOWMAN, model_size, page_size)

    monkeypatch.setitem(TASKS, "ocr", dataclasses.replace(TASKS["ocr"], parse=ocr_fields))
    monkeypatch.setitem(TASKS, "ground", dataclasses.replace(TASKS["ground"], parse=ground_fields))


# --------------------------------------------------------------------------------------------------
# Markers
# --------------------------------------------------------------------------------------------------


def pytest_configure(config):
    """torch.compile in this run (tests and the processes they start) caches into a folder of its own,
    empty at the start: what a test compiles must not depend on what earlier runs left in the
    machine's shared cache. Tests that need a cold cache of their own set TORCHINDUCTOR_CACHE_DIR."""
    config.inductor_cache = tempfile.mkdtemp(prefix="kosmos-tests-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = config.inductor_cache


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "inductor_cache", ""), ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is available (the parity suite on the GPU)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
