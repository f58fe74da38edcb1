"""Continuous batching, per-page budgets, the n-gram ban, the loop guard, and the pipeline on top."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kosmos_cli
from kosmos_cli.engine import Job
from kosmos_cli import pipeline
from kosmos_cli.pages import ErrorJob, PageJob
from kosmos_cli.tasks import TASKS
from kosmos_cli.models import generation
from kosmos_cli.models.generation import ban_repeated_ngrams
from kosmos_cli.models.cache import StepPlan
from kosmos_cli.models import layers
from kosmos_cli.models.layers import flex_decoding
from kosmos_cli.tasks.repetition import WINDOW, find_loop, may_loop
from tests.helpers import compile_run


FLEX_HERE = layers.flex_unsupported(torch.device("cpu"), 96) is None
needs_flex = pytest.mark.skipif(not FLEX_HERE, reason=f"FlexAttention decoding needs torch >= 2.10 ({torch.__version__})")


REPO = Path(__file__).resolve().parents[1]
IMAGES, PROMPTS, LIMITS = compile_run.images(), compile_run.prompts(), compile_run.LIMITS


@pytest.fixture(scope="module")
def alone(engine):
    return [engine.run([im], p, n)[0] for im, p, n in zip(IMAGES, PROMPTS, LIMITS)]


@pytest.mark.parametrize("slots", [1, 2, 3, 7])
def test_continuous_batching_equals_one_at_a_time(engine, alone, slots):
    """Fewer slots than pages: finished slots are refilled mid-decode; results stay identical."""
    outputs = engine.run(IMAGES, PROMPTS, LIMITS, batch_size=slots)
    assert [(o.ids, o.stop) for o in outputs] == [(o.ids, o.stop) for o in alone]


@pytest.mark.parametrize("slots", [2, 3, 7])
def test_the_cuda_schedule_gives_identical_results(engine, alone, slots, monkeypatch):
    """The GPU's loop policy run on the CPU: host checks every 8 steps (finished slots step on
    pads meanwhile), power-of-two rows that include free slots, 256-token attention spans."""
    monkeypatch.setattr(generation, "schedule_for", lambda device: generation.CUDA_SCHEDULE)
    outputs = engine.run(IMAGES, PROMPTS, LIMITS, batch_size=slots)
    assert [(o.ids, o.stop) for o in outputs] == [(o.ids, o.stop) for o in alone]
    # The page that sizes the cache ends 3 steps before a host check: it steps on past its budget.
    forced = engine.run(IMAGES[:2], "<ocr>", [21, 29], min_new_tokens=[21, 29], batch_size=slots)
    assert [len(o.ids) for o in forced] == [21, 29]


def test_per_page_budgets_and_stop_reasons(alone):
    for out, limit in zip(alone, LIMITS):
        assert len(out.ids) <= limit
        assert out.stop in ("eos", "length")
        assert (out.stop == "length") == (len(out.ids) == limit)
    assert alone[LIMITS.index(0)].ids == []


def test_lazy_stream_yields_every_key_once(engine, alone):
    jobs = (Job(i, engine.prepare(im), p, n) for i, (im, p, n) in enumerate(zip(IMAGES, PROMPTS, LIMITS)))
    longest = max(engine.prompt_length(p) for p in PROMPTS)
    got = dict(engine.stream(jobs, slots=2, max_prompt_tokens=longest, max_new_tokens=max(LIMITS)))
    assert sorted(got) == list(range(len(IMAGES)))
    assert [got[i].ids for i in range(len(IMAGES))] == [o.ids for o in alone]


def test_stream_rejects_budgets_beyond_the_cache(engine):
    jobs = iter([Job(0, engine.prepare(IMAGES[0]), "<ocr>", 50)])
    with pytest.raises(ValueError, match="exceed the stream's bounds"):
        list(engine.stream(jobs, slots=1, max_prompt_tokens=engine.prompt_length("<ocr>"), max_new_tokens=10))


@pytest.mark.parametrize("schedule", [generation.CPU_SCHEDULE, generation.CUDA_SCHEDULE])
@pytest.mark.parametrize("screen", [None, "all", "none"])
def test_loop_check_stops_a_row_and_keeps_the_prefix(engine, monkeypatch, schedule, screen):
    """The check sees at most `window` trailing ids, and the whole row once it fires; on the GPU's
    schedule a device screen (`may_loop`) decides which rows reach it."""
    monkeypatch.setattr(generation, "LOOP_CHECK_EVERY", 4)
    monkeypatch.setattr(generation, "schedule_for", lambda device: schedule)
    calls = []

    def keep(ids):
        calls.append(len(ids))
        return 3 if len(ids) >= 6 else None

    may_loop = {None: None, "all": lambda tails: torch.ones(len(tails), dtype=torch.bool),
                "none": lambda tails: torch.zeros(len(tails), dtype=torch.bool)}[screen]
    check = generation.LoopCheck(keep, window=6, may_loop=may_loop)
    out = engine.run([IMAGES[0], IMAGES[1]], "<ocr>", [60, 2], loop_check=check)
    full = engine.run([IMAGES[0]], "<ocr>", 60)[0]
    if screen == "none" and schedule.loop_prefilter:  # screened out: the check never runs
        assert out[0].ids == full.ids and not calls
        return
    assert out[0].stop == "loop" and out[0].ids == full.ids[:3]
    assert out[1].stop in ("eos", "length")
    assert max(calls[:-1]) <= 6 and calls[-1] >= 8  # tails only, then the whole row


def test_the_device_screen_never_misses_a_loop():
    """may_loop is a necessary condition of find_loop: rows it rejects have no loop (checked on
    random rows, a third ending in an exact loop, a third in short-period runs)."""
    rng = random.Random(1)
    rows, expected = [], []
    for k in range(300):
        n = rng.randrange(256, WINDOW + 1)
        ids = [rng.randrange(5, 30) for _ in range(n)]
        if k % 3 == 0:
            period, repeats = rng.randrange(1, 201), rng.randrange(2, 6)
            unit = [rng.randrange(5, 30) for _ in range(period)]
            ids = ids[: max(0, n - period * repeats)] + unit * repeats
        elif k % 3 == 1:
            unit = [rng.randrange(5, 8) for _ in range(rng.randrange(1, 50))]
            ids = ids[:-300] + (unit * 300)[:300]
        rows.append([0] * (WINDOW - len(ids)) + ids[-WINDOW:])
        expected.append(find_loop(ids[-WINDOW:]) is not None)
    screened = may_loop(torch.tensor(rows)).tolist()
    assert sum(expected) > 50 and all(s for s, e in zip(screened, expected) if e)
    assert sum(screened) < len(rows)  # and it does screen rows out


@pytest.mark.parametrize("n", [2, 3, 4])
def test_ngram_ban_matches_transformers(n):
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    torch.manual_seed(n)
    vocab, batch = 11, 5
    lengths = torch.tensor([1, 2, 6, 15, 20])
    tokens = torch.randint(0, 4, (batch, 24))  # a small alphabet makes repeats likely
    logits = torch.randn(batch, vocab)
    ours = logits.clone()
    ban_repeated_ngrams(ours, tokens, lengths, n)
    for b in range(batch):
        seq = tokens[b : b + 1, : lengths[b]]
        expected = NoRepeatNGramLogitsProcessor(n)(seq, logits[b : b + 1].clone())
        assert torch.equal(ours[b : b + 1], expected)


def _jobs(images):
    """PageJobs with images already rendered, plus an error item in the middle."""
    items = [PageJob(source=f"doc{i}.png", stem=f"doc{i}", page=1, num_pages=1, selected=(1,), image=im)
             for i, im in enumerate(images)]
    items.insert(2, ErrorJob("broken.pdf", "broken", None, "not a PDF"))
    return items


def test_pipeline_keeps_input_order_with_errors_in_between(engine):
    task = TASKS["ocr"]
    items = _jobs(IMAGES[:5])
    got = list(pipeline.transcribe(engine, task, iter(items), batch_size=2, max_new_tokens=12))
    assert [item for item, _ in got] == items
    assert [r is None for _, r in got] == [False, False, True, False, False, False]
    for (item, result) in got:
        if result is not None:
            assert (result.width, result.height) == item.image.size and result.task == "ocr"


def test_pipeline_recovers_from_out_of_memory(engine, monkeypatch):
    """The first stream with more than one slot runs out of memory: slots halve, nothing is lost."""
    real_stream, seen = engine.stream, []

    def flaky_stream(jobs, *, slots, **kwargs):
        seen.append(slots)
        if slots > 1:
            next(iter(jobs))  # a page is in flight when memory runs out
            raise torch.OutOfMemoryError("CUDA out of memory")
        yield from real_stream(jobs, slots=slots, **kwargs)

    monkeypatch.setattr(engine, "stream", flaky_stream)
    items = _jobs(IMAGES[:4])
    got = list(pipeline.transcribe(engine, TASKS["md"], iter(items), batch_size=4, max_new_tokens=5))
    assert seen == [4, 2, 1]
    assert [item for item, _ in got] == items
    assert all(r is not None and r.error is None for item, r in got if isinstance(item, PageJob))


def test_pipeline_fails_only_the_page_that_never_fits(engine, monkeypatch):
    def always_oom(jobs, *, slots, **kwargs):
        for _ in jobs:  # any page in flight runs out of memory
            raise torch.OutOfMemoryError("CUDA out of memory")
        yield from ()

    monkeypatch.setattr(engine, "stream", always_oom)
    items = [item for item in _jobs(IMAGES[:2]) if isinstance(item, PageJob)]
    got = list(pipeline.transcribe(engine, TASKS["md"], iter(items), batch_size=1, max_new_tokens=5))
    assert [r.error for _, r in got] == [pipeline.OUT_OF_MEMORY] * 2


def test_per_page_min_new_tokens(engine):
    lengths = [5, 0, 12]
    out = engine.run(IMAGES[:3], "<ocr>", max_new_tokens=lengths, min_new_tokens=lengths)
    assert [len(o.ids) for o in out] == lengths


def test_auto_batch_size_fits_free_memory(engine, monkeypatch):
    assert engine.auto_batch_size("<ocr>", 100) == 4  # CPU
    monkeypatch.setattr(engine, "device", torch.device("cuda"))
    text = engine.config.text
    per_slot = text.layers * 2 * text.embed_dim * 4 * (engine.prompt_length("<ocr>") + 100) + text.vocab_size * 8
    reserve = engine.admission_bytes(engine.prompt_length("<ocr>"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (reserve + 10 * per_slot, 80 * 2**30))
    assert engine.auto_batch_size("<ocr>", 100) == 9  # 90% of the room for 10 slots
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (reserve, 80 * 2**30))
    assert engine.auto_batch_size("<ocr>", 100) == 1


def test_the_admission_reserve_follows_the_model(engine):
    """The vision encoder's activations for ADMIT_CHUNK images plus their prefill: the real
    Kosmos-2.5 in bf16 (4,096 patches of width 1,536, MLP 3,968; 2,060-token prompts) needs ~3 GiB."""
    from kosmos_cli.models import kosmos2_5
    from kosmos_cli.models.config import Kosmos25Config

    real = kosmos_cli.engine.Engine.__new__(kosmos_cli.engine.Engine)
    real.config, real.image_processor, real.dtype = Kosmos25Config(), kosmos2_5.ImageProcessor(4096), torch.bfloat16
    assert 2.9 * 2**30 < real.admission_bytes(2060) < 3.1 * 2**30
    assert engine.admission_bytes(40) < real.admission_bytes(40)


def test_newcomers_are_admitted_a_chunk_at_a_time(engine, alone, monkeypatch):
    monkeypatch.setattr(generation, "ADMIT_CHUNK", 3)
    sizes = []
    real_encode = engine.model.encode_images
    monkeypatch.setattr(engine.model, "encode_images", lambda x: sizes.append(len(x)) or real_encode(x))
    outputs = engine.run(IMAGES, PROMPTS, LIMITS, batch_size=7)
    assert sizes[:3] == [3, 3, 1] and max(sizes) <= 3
    assert [(o.ids, o.stop) for o in outputs] == [(o.ids, o.stop) for o in alone]


def test_the_library_caps_its_slots_and_backs_off_out_of_memory(engine, alone, monkeypatch):
    """run() without batch_size decodes as many images as auto_batch_size allows (4 on the CPU), not
    one slot per image, and halves its slots when memory runs out, like the pipeline."""
    slots, calls = [], []
    real_stream, real_step = engine.stream, generation.decode_step

    def stream(jobs, **kwargs):
        slots.append(kwargs["slots"])
        return real_stream(jobs, **kwargs)

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "stream", stream)
    monkeypatch.setattr(generation, "decode_step", step)
    outputs = engine.run(IMAGES, PROMPTS, LIMITS)
    assert slots == [4, 2]
    assert [(o.ids, o.stop) for o in outputs] == [(o.ids, o.stop) for o in alone]


def test_the_library_raises_when_one_image_alone_runs_out_of_memory(engine, monkeypatch):
    """run() halves its slots down to one; an image that runs out of memory alone is an error."""
    seen = []

    def always_oom(jobs, *, slots, **kwargs):
        seen.append(slots)
        for _ in jobs:  # any image in flight runs out of memory
            raise torch.OutOfMemoryError("CUDA out of memory")
        yield from ()

    monkeypatch.setattr(engine, "stream", always_oom)
    with pytest.raises(torch.OutOfMemoryError, match="image 0 alone"):
        engine.run(IMAGES[:3], "<ocr>", 5, batch_size=2)
    assert seen == [2, 1]


def test_the_callers_code_between_results_is_not_in_inference_mode(engine):
    jobs = [Job(i, engine.prepare(im), "<ocr>", 3) for i, im in enumerate(IMAGES[:3])]
    stream = engine.stream(iter(jobs), slots=2, max_prompt_tokens=engine.prompt_length("<ocr>"), max_new_tokens=3)
    for _ in stream:
        assert not torch.is_inference_mode_enabled()
        assert torch.ones(2, requires_grad=True).sum().requires_grad


@pytest.fixture(scope="module")
def workload(engine):
    """The compile workload's outputs, decoded eagerly in this process."""
    return compile_run.run(engine)


@pytest.mark.parametrize("attention, schedule", [("sdpa", "cpu"), pytest.param("flex", "cpu", marks=needs_flex),
                                                  ("sdpa", "cuda")])
def test_one_compile_with_a_cold_and_then_a_warm_cache(kosmos25_sharded, workload, attention, schedule, tmp_path):
    """torch.compile of the decode step (CUDA graphs on a GPU; inductor here), attending with SDPA or
    FlexAttention, on the CPU's and the GPU's loop schedule: the same ids as eager (and log-probabilities
    within 1e-5 nats), and one compile
    for the whole workload (a draining run, pages that cross several span buckets, two slots, one
    image), in a fresh process with an empty inductor cache and again in another fresh process with
    the cache the first one left, as every run after a user's first has."""
    cache = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    command = [sys.executable, "-m", "tests.helpers.compile_run", str(kosmos25_sharded), "--device", "cpu",
               "--attention", attention, "--schedule", schedule]
    for run in ("cold", "warm"):
        done = subprocess.run(command, env=cache, capture_output=True, text=True, cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        got = json.loads(done.stdout.splitlines()[-1])
        assert not got["compile_broken"] and got["flex"] == (attention == "flex")
        assert got["ids"] == [out.ids for out in workload], run
        assert max(abs(a - b) for got_row, out in zip(got["logprobs"], workload, strict=True)
                   for a, b in zip(got_row, out.logprobs, strict=True)) <= 1e-5, run
        assert got["dynamo_graphs"] == 1, (run, got["dynamo_graphs"], done.stderr[-3000:])


def test_a_failing_compile_falls_back_to_eager(engine, alone, monkeypatch):
    step = generation.CompiledDecodeStep(torch.device("cpu"), 96)

    def broken(*args, **kwargs):
        raise torch._inductor.exc.InvalidCxxCompiler()

    monkeypatch.setattr(step, "compiled", broken)
    monkeypatch.setattr(engine, "compiled", step)
    with pytest.warns(UserWarning, match="decoding without it"):
        outputs = engine.run(IMAGES[:2], PROMPTS[:2], LIMITS[:2])
    assert step.broken and [o.ids for o in outputs] == [o.ids for o in alone[:2]]


def test_the_cuda_compile_silences_the_graph_count_warning():
    """Many recorded graphs are the plan on CUDA, so torch's warning past 8 would only alarm users;
    a CPU compile leaves the setting alone (compiling is lazy: nothing runs here)."""
    triton = torch._inductor.config.triton
    if not hasattr(triton, "cudagraph_dynamic_shape_warn_limit"):
        pytest.skip(f"torch {torch.__version__} has no graph count warning to silence")
    # The config's own patch, which restores the setting the way torch expects (plain attribute
    # patching left torch 2.10's config unable to copy itself, failing every later compile).
    with torch._inductor.config.patch({"triton.cudagraph_dynamic_shape_warn_limit": 8}):
        generation.CompiledDecodeStep(torch.device("cpu"), 96)
        assert triton.cudagraph_dynamic_shape_warn_limit == 8
        generation.CompiledDecodeStep(torch.device("cuda"), 96)
        assert triton.cudagraph_dynamic_shape_warn_limit is None


def _step_inputs(decoder, slots=3, capacity=64, static=True):
    cache = decoder.new_cache(slots, capacity, dtype=torch.float32, device="cpu", static=static)
    return (decoder, cache, torch.randn(slots, decoder.dim), torch.ones(slots, capacity, dtype=torch.long),
            torch.tensor([5, 9, 7]), torch.zeros(slots, dtype=torch.long), torch.full((slots,), 60),
            torch.zeros(slots, dtype=torch.bool), torch.tensor([2]), 1, 0, 32)


@pytest.mark.parametrize("flex", [False, pytest.param(True, marks=needs_flex)])
def test_the_decode_step_traces_as_one_graph(engine, flex):
    """A graph break would split the step into several graphs (several CUDA graphs, host work between)."""
    with torch.inference_mode():
        explained = torch._dynamo.explain(generation.decode_step)(*_step_inputs(engine.model.text), flex=flex)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")  # by the cache switch below, as meant
@pytest.mark.parametrize(("static", "flex"), [(True, False), (False, False), pytest.param(True, True, marks=needs_flex)])
def test_the_compiled_step_writes_only_static_inputs(engine, static, flex, monkeypatch):
    """CUDA graphs are skipped for a compiled function that mutates an input without a fixed address
    (torch's check_for_mutation). The decode step's only writes are the KV cache's, so a static cache
    is what keeps the step graphable; the non-static case shows the check would see the difference.
    Inputs other than tensors and sizes would also skip graphs. Runs the compile on the CPU and reads
    inductor's own record of the graph's inputs."""
    from torch._inductor.output_code import CompiledFxGraph

    seen = []
    original = CompiledFxGraph.post_compile

    def record(graph, example_inputs, constants, graph_kwargs):
        tensors_only = all(isinstance(t, (torch.Tensor, torch.SymInt)) for t in example_inputs)  # another skip reason
        seen.append((set(graph.mutated_input_idxs), set(graph.fx_kwargs["static_input_idxs"]), tensors_only))
        return original(graph, example_inputs, constants, graph_kwargs)

    monkeypatch.setattr(CompiledFxGraph, "post_compile", record)
    torch._dynamo.reset()  # compile afresh, not from another test's dynamo cache
    step = torch.compile(generation.decode_step, dynamic=True, mode="reduce-overhead")
    # Nor from inductor's graph cache: torch 2.10/2.11 hand the static case's graph (and its record) back.
    with torch.inference_mode(), torch._inductor.config.patch(force_disable_caches=True):
        step(*_step_inputs(engine.model.text, static=static), flex=flex)
    torch._dynamo.reset()
    assert len(seen) == 1
    mutated, static_inputs, tensors_only = seen[0]
    assert tensors_only
    assert len(mutated) == 2 * len(engine.model.text.layers)  # each layer's keys and values
    assert (mutated <= static_inputs) == static


@needs_flex
@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
@pytest.mark.parametrize("span", [64, 192, 256, 300])
def test_flex_block_mask_attends_like_the_length_mask(span):
    """Slots ending on, before and after block boundaries (128), a span that is not a multiple of
    the block, and one slot still at its first token."""
    torch.manual_seed(span)
    starts = torch.tensor([0, 126, 127, 128, 129, 255, 256, 299, 17])
    starts = starts.clamp(max=span - 1)
    n, heads, dim = len(starts), 2, 16
    q = torch.randn(n, heads, 1, dim)
    keys, values = torch.randn(n, heads, span + 40, dim)[:, :, :span], torch.randn(n, heads, span, dim)
    masked = StepPlan.decode_all(starts, span).attend(q, keys, values)
    flex = StepPlan.decode_all(starts, span, flex=True).attend(q, keys, values)
    torch.testing.assert_close(flex, masked, rtol=1e-5, atol=1e-5)
    blocked = values.clone()
    for b, start in enumerate(starts.tolist()):  # keys past a slot's length must not matter
        blocked[b, :, start + 1 :] = 1e4
    torch.testing.assert_close(StepPlan.decode_all(starts, span, flex=True).attend(q, keys, blocked), masked,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("choice", "device", "flex"), [
    ("auto", "cpu", True), ("auto", "cuda", False), ("flex", "cuda", True), ("sdpa", "cpu", False)])
def test_flex_decoding_where_measured_faster_or_asked_for(choice, device, flex, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.13.0")  # the choice, on a torch that can (the gate: test_cuda_readiness)
    assert flex_decoding(torch.device(device), 96, choice) == flex


def test_an_unknown_attention_choice_fails_at_load(kosmos25_sharded):
    with pytest.raises(ValueError, match="attention='flash': use one of auto, sdpa, flex"):
        kosmos_cli.load(kosmos25_sharded, device="cpu", attention="flash")


def test_compiled_engine_keeps_its_cache(kosmos25_sharded, alone):
    compiled = kosmos_cli.load(kosmos25_sharded, device="cpu", compile=True)
    first = compiled.run(IMAGES[:3], PROMPTS[:3], LIMITS[:3], batch_size=3)
    cache = compiled.kept_cache
    second = compiled.run(IMAGES[3:5], PROMPTS[3:5], LIMITS[3:5], batch_size=2)  # fewer slots, shorter
    assert compiled.kept_cache is cache
    bigger = compiled.run(IMAGES, PROMPTS, [n + 10 for n in LIMITS], batch_size=4)
    assert compiled.kept_cache is not cache and compiled.kept_cache.fits(4, 0)
    assert not compiled.compiled.broken  # a new cache must not break the compiled step (it fell back once)
    assert [o.ids for o in first + second] == [o.ids for o in alone[:5]]
    assert [o.ids[: n] for o, n in zip(bigger, LIMITS)] == [o.ids for o in alone]
