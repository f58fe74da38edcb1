"""Out-of-memory on the way through the pipeline: injected at decode steps and at prefill, once or
several times in a row; nothing is lost, nothing is duplicated, and the results equal a run that
never ran out of memory (greedy decoding is deterministic; fp32 on the CPU is exact)."""

import json
import random

import pytest
import torch

import kosmos_cli
from kosmos_cli.engine import Job
from kosmos_cli import pipeline
from kosmos_cli.pages import ErrorJob, PageJob
from kosmos_cli.tasks import TASKS
from kosmos_cli.models import generation
from kosmos_cli.models.loading import ModelLoadError
from tests.helpers.images import noise_image

IMAGES = [noise_image(*size, seed=10 + i) for i, size in enumerate(
    [(40, 30), (300, 120), (64, 640), (128, 128), (90, 200), (33, 33), (250, 80), (70, 70)])]
BUDGET = 14


def pages(images=IMAGES):
    """Rendered page jobs, with a failed document in the middle (it must pass through in place)."""
    items = [PageJob(source=f"doc{i}.png", stem=f"doc{i}", page=1, num_pages=1, selected=(1,), image=im)
             for i, im in enumerate(images)]
    items.insert(3, ErrorJob("broken.pdf", "broken", None, "not a PDF"))
    return items


def outcome(got):
    return [(item.source, None if result is None else (result.raw, result.truncated, result.error))
            for item, result in got]


@pytest.fixture(scope="module")
def clean(engine):
    """The run that never runs out of memory."""
    got = list(pipeline.transcribe(engine, TASKS["md"], iter(pages()), batch_size=8, max_new_tokens=BUDGET))
    assert all(r is None or r.error is None for _, r in got)
    return outcome(got)


class OutOfMemory:
    """Raises CUDA's out-of-memory error at chosen calls of a function: first at call `first`, then,
    `times - 1` more times, again `gap()` calls after the previous one (the retry runs out too)."""

    def __init__(self, function, first: int, times: int, gap=lambda: 1):
        self.function, self.next_failure, self.left, self.gap = function, first, times, gap
        self.calls = self.raised = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.left and self.calls == self.next_failure:
            self.left -= 1
            self.raised += 1
            self.next_failure = self.calls + self.gap()
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.function(*args, **kwargs)


def inject(monkeypatch, engine, where: str, first: int, times: int, gap=lambda: 1) -> OutOfMemory:
    if where == "decode":
        fault = OutOfMemory(generation.decode_step, first, times, gap)
        monkeypatch.setattr(generation, "decode_step", fault)
    else:  # prefill: the vision encoder runs for every admission of newcomers, then their prompts
        fault = OutOfMemory(engine.model.encode_images, first, times, gap)
        monkeypatch.setattr(engine.model, "encode_images", fault)
    return fault


@pytest.mark.parametrize("times", [1, 2, 3])
@pytest.mark.parametrize("where", ["decode", "prefill"])
@pytest.mark.parametrize("seed", [0, 1])
def test_out_of_memory_loses_nothing(engine, clean, monkeypatch, where, times, seed):
    """Decode: at a random step, then again 1-3 steps into each retry. Prefill: the first admission
    of 8 pages, then the first admission of each retry (or, seed 1, the refill after it)."""
    rng = random.Random(seed)
    if where == "decode":
        fault = inject(monkeypatch, engine, where, rng.randrange(1, 12), times, gap=lambda: 1 + rng.randrange(3))
    else:
        fault = inject(monkeypatch, engine, where, 1, times, gap=lambda: 1 + seed)
    slots = []
    real_stream = engine.stream

    def counting_stream(jobs, **kwargs):
        slots.append(kwargs["slots"])
        return real_stream(jobs, **kwargs)

    monkeypatch.setattr(engine, "stream", counting_stream)
    got = list(pipeline.transcribe(engine, TASKS["md"], iter(pages()), batch_size=8, max_new_tokens=BUDGET))
    assert fault.raised == times
    assert slots == [8, 4, 2, 1][: times + 1]  # halved after each out-of-memory, 8 slots leave room for 3
    assert outcome(got) == clean  # every item once, in order, with the results of the clean run


def test_the_page_that_runs_out_of_memory_alone_fails_and_the_rest_is_kept(engine, clean, monkeypatch):
    """Two slots: the first out-of-memory halves them, the second (one slot, one page) fails that page."""
    inject(monkeypatch, engine, "decode", first=3, times=2)  # the second hits a page retried alone
    got = outcome(pipeline.transcribe(engine, TASKS["md"], iter(pages()), batch_size=2, max_new_tokens=BUDGET))
    failed = [i for i, (_, result) in enumerate(got) if result is not None and result[2] is not None]
    assert len(failed) == 1 and got[failed[0]][1][2] == pipeline.OUT_OF_MEMORY
    assert [g for i, g in enumerate(got) if i not in failed] == [c for i, c in enumerate(clean) if i not in failed]


def test_out_of_memory_twice_keeps_the_pages_waiting_for_a_retry(engine, clean, monkeypatch):
    """The regression: the second out-of-memory came before every page of the first retry was
    re-admitted, and the ones not yet re-admitted were dropped (6 in, 2 out)."""
    real_stream = engine.stream
    streams = []

    def stream(jobs, *, slots, **kwargs):
        streams.append(slots)
        if len(streams) <= 2:  # out of memory once `slots` pages are in flight, twice in a row
            for _ in range(slots):
                next(jobs)
            raise torch.OutOfMemoryError("CUDA out of memory")
        yield from real_stream(jobs, slots=slots, **kwargs)

    monkeypatch.setattr(engine, "stream", stream)
    got = list(pipeline.transcribe(engine, TASKS["md"], iter(pages()), batch_size=4, max_new_tokens=BUDGET))
    assert streams == [4, 2, 1]
    assert outcome(got) == clean


def test_a_page_the_engine_never_returns_is_an_error_not_a_silent_loss(engine, monkeypatch):
    """The end of `pipeline.transcribe` proves every item that went in came out: a page lost by the
    layer below (a bug, simulated here) stops the run with an error instead of ending it short."""
    real = engine.stream_backing_off

    def losing(jobs, **kwargs):
        results = real(jobs, **kwargs)
        next(results)  # the first page done goes missing
        yield from results

    monkeypatch.setattr(engine, "stream_backing_off", losing)
    with pytest.raises(RuntimeError, match=r"internal error: PageJob\(source='doc\d.png'.* and \d+ more items never came out"):
        list(pipeline.transcribe(engine, TASKS["md"], iter(pages(IMAGES[:3])), batch_size=2, max_new_tokens=BUDGET))


def test_out_of_memory_releases_the_kept_cache(engine, monkeypatch):
    """A compiled engine keeps its KV cache between streams; after out-of-memory it must be dropped,
    so the retry with half the slots allocates half the cache instead of reusing the big one."""
    monkeypatch.setattr(engine, "compiled", lambda *args: generation.decode_step(*args))  # keeps a cache, no compile
    sizes = []
    real_cache = engine._cache

    def cache(slots, capacity):
        kept = real_cache(slots, capacity)
        sizes.append(kept.slots)
        return kept

    monkeypatch.setattr(engine, "_cache", cache)
    inject(monkeypatch, engine, "decode", first=2, times=1)
    list(pipeline.transcribe(engine, TASKS["md"], iter(pages(IMAGES[:4])), batch_size=4, max_new_tokens=BUDGET))
    assert sizes == [4, 2] and engine.kept_cache.slots == 2
    engine.kept_cache = None


def test_out_of_memory_in_the_compiled_step_keeps_compiling(engine):
    """Only a compiler failure turns compiling off; running out of memory is the caller's to handle."""
    step = generation.CompiledDecodeStep(torch.device("cpu"), 96)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    step.compiled = out_of_memory
    with pytest.raises(torch.OutOfMemoryError):
        step()
    assert not step.broken

    def wrapped(*args, **kwargs):  # as dynamo reports an out-of-memory met while compiling
        import torch._dynamo.exc

        try:
            out_of_memory()
        except torch.OutOfMemoryError as oom:
            raise torch._dynamo.exc.TorchDynamoException("backend compiler failed") from oom

    step.compiled = wrapped
    with pytest.raises(torch.OutOfMemoryError):
        step()
    assert not step.broken

    def cuda_fault(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    step.compiled = cuda_fault
    with pytest.raises(RuntimeError, match="illegal memory access"):
        step()
    assert not step.broken


def test_a_stream_refuses_a_job_beyond_its_bounds_before_working_on_it(engine, monkeypatch):
    encoded = []
    monkeypatch.setattr(engine.model, "encode_images", lambda x: encoded.append(x) or pytest.fail("worked on it"))
    prompt_tokens = engine.prompt_length("<ocr>")
    jobs = iter([Job(0, engine.prepare(IMAGES[0]), "<ocr>", 50)])
    with pytest.raises(ValueError, match="job 0: .* exceed the stream's bounds"):
        list(engine.stream(jobs, slots=1, max_prompt_tokens=prompt_tokens, max_new_tokens=10))
    assert not encoded


def test_an_engine_runs_one_stream_at_a_time(engine):
    jobs = [Job(i, engine.prepare(im), "<ocr>", 3) for i, im in enumerate(IMAGES[:2])]
    first = engine.stream(iter(jobs), slots=1, max_prompt_tokens=engine.prompt_length("<ocr>"), max_new_tokens=3)
    next(first)
    with pytest.raises(RuntimeError, match="already running a stream"):
        next(engine.stream(iter(jobs), slots=1, max_prompt_tokens=engine.prompt_length("<ocr>"), max_new_tokens=3))
    first.close()
    assert len(list(engine.stream(iter(jobs), slots=1, max_prompt_tokens=engine.prompt_length("<ocr>"),
                                  max_new_tokens=3))) == 2


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("[2]", "must hold a JSON object"),
    ('{"eos_token_id": "</s>"}', "eos_token_id must be a token id"),
    ('{"eos_token_id": []}', "eos_token_id must be a token id"),
])
def test_a_malformed_generation_config_is_reported(kosmos25_sharded, tmp_path, content, message):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for path in kosmos25_sharded.iterdir():
        if path.name != "generation_config.json":
            (checkpoint / path.name).symlink_to(path)
    (checkpoint / "generation_config.json").write_text(content)
    with pytest.raises(ModelLoadError, match=message):
        kosmos_cli.load(checkpoint, device="cpu")
    (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert kosmos_cli.load(checkpoint, device="cpu").eos_ids == [2, 7]
