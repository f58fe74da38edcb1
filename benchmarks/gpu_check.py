"""The GPU check: one command, proven on the CPU first, that measures what only a GPU can settle.

    python benchmarks/gpu_check.py --make-wheels .whl                  # here: the wheels it carries (needs PyPI)
    python benchmarks/gpu_check.py --out $OUT --budget 480 --wheels .whl   # there: offline, time-boxed
    python benchmarks/gpu_check.py --out /tmp/check --dry-run          # every step on the CPU, tiny models

Each step runs in a process of its own under its own timeout (a hung compile cannot be stopped from
inside) and writes what it measured into WORK/steps/STEP.json as it goes; after every step the
driver gathers them into OUT/results.json and OUT/results.md and appends the step's output to
OUT/steps.log, so a run cut short still returns what it measured, in three files (the GPU machine
sends back at most eight). Steps run
in order of value; one whose estimate does not fit in what is left of --budget is skipped, and the
table says so (--steps runs a chosen few, e.g. the ones a short run skipped).

Carried wheels are installed with `pip install --no-index --no-deps --target WORK/site` and put
*after* the machine's own site-packages (a sitecustomize.py in WORK/boot, on PYTHONPATH, appends
them), so the machine's torch, transformers and the rest stay in charge: the oracle is whatever
transformers the machine has. Large files (the full-size checkpoint, inductor caches) go to --work,
never to --out, whose files travel back.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # kosmos_cli, tests.helpers and benchmarks.throughput, from the checkout

# What the GPU machine lacks and a step needs, pinned (kosmos_cli's CLI imports pypdfium2). Nothing
# else travels: flash-attn has no wheel, so its path stays unmeasured.
WHEELS = ["pypdfium2==5.15.2"]
WHEEL_PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64"]
WHEEL_BUDGET = 64 * 2**20  # what one call to the GPU machine carries, the working tree included
# Packages the GPU machine does not have: the dry run hides them, so that a step (or a test module it
# collects) that imports one fails here, not there.
ABSENT_THERE = ["pikepdf", "hocr_spec", "ray", "flash_attn"]


@dataclass(frozen=True)
class Workloads:
    """The sizes each step runs at: on the GPU, and in the dry run (CPU, tiny models)."""

    size: str  # benchmarks/throughput.py's model size
    pages: int
    batch: int
    lengths: str  # forced new tokens per page, LO-HI
    hf1_pages: int
    first_page_tokens: int
    bf16_tokens: int


GPU = Workloads(size="full", pages=64, batch=32, lengths="50-600", hf1_pages=4, first_page_tokens=64, bf16_tokens=48)
DRY = Workloads(size="small", pages=4, batch=2, lengths="4-12", hf1_pages=2, first_page_tokens=8, bf16_tokens=16)


@dataclass
class Context:
    work: Path
    dry: bool
    device: str
    load: Workloads
    step: str

    def record(self, **values) -> None:
        """Merge values into WORK/steps/STEP.json at once: what a step measured survives its timeout."""
        path = self.work / "steps" / f"{self.step}.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data.update(values)
        path.write_text(json.dumps(data, indent=1, default=str))

    def model(self, name: str) -> Path:
        """A tiny checkpoint (built on first use, kept in WORK/models): `head16` has 16-wide decoder
        heads, the least FlexAttention's CUDA kernels take."""
        from tests.helpers.kosmos2_5 import make_kosmos2_5_checkpoint

        path = self.work / "models" / name
        if not (path / "config.json").exists():
            path.mkdir(parents=True, exist_ok=True)
            make_kosmos2_5_checkpoint(path, tied=False, sharded=False, image_dependent=True, text_heads=2)
        return path

    def python(self, *args: str, cache: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run python with args from the checkout (the carried wheels after the machine's packages)."""
        env = dict(os.environ)
        if cache is not None:
            env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
        done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"python {' '.join(args[:3])} ... exited {done.returncode}: {done.stderr[-1500:]}")
        return done


# --------------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------------


def step_environment(ctx: Context) -> None:
    """GPU, versions, what `auto` picks, and whether torch.compile works at all here."""
    import sysconfig

    import torch

    from kosmos_cli.engine import pick_dtype
    from kosmos_cli.models.layers import flash_available, flex_decoding

    device = torch.device(ctx.device)
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": ctx.device}
    # Where each carried module comes from: the machine's own copy wins over a carried one.
    carried = sorted({p.name.split("-")[0].removesuffix(".py") for p in (ctx.work / "site").glob("*")
                      if not p.name.endswith((".dist-info", ".data")) and p.name != "bin"})
    for name in ("triton", "transformers", *carried):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
            info[f"{name}_from"] = str(Path(module.__file__).parent.parent if module.__file__.endswith("__init__.py")
                                       else Path(module.__file__).parent)
        except ImportError as err:
            info[name] = f"absent ({err})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "capability": f"sm_{props.major}{props.minor}"}
    info |= {"auto_dtype": str(pick_dtype("auto", device)).removeprefix("torch."),
             "auto_decode_attention": "flex" if flex_decoding(device, 96, "auto") else "sdpa",
             "flash_attn": flash_available(device, "auto"),
             "c_compiler": shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc"),
             "python_headers": (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()}
    ctx.record(**info)
    # A compile that silently fell back to eager would make every "compiled" number an eager one.
    from torch._dynamo.utils import counters

    def probe(x):
        return (x.sin() + 1) * 2

    started = time.perf_counter()
    try:
        compiled = torch.compile(probe, mode="reduce-overhead" if device.type == "cuda" else None)
        x = torch.randn(1000, device=device)
        for _ in range(3):
            got = compiled(x)
        ok = bool(torch.allclose(got, probe(x), atol=1e-5)) and counters["stats"]["unique_graphs"] == 1
        ctx.record(compile_ok=ok, compile_seconds=round(time.perf_counter() - started, 1))
    except Exception as err:  # the point is to report it
        ctx.record(compile_ok=False, compile_error=f"{type(err).__name__}: {str(err)[:500]}")
    if not json.loads((ctx.work / "steps" / "environment.json").read_text())["compile_ok"]:
        raise RuntimeError("torch.compile does not work here: every compiled number would be eager")


def step_cuda_graphs(ctx: Context) -> None:
    """The compiled step (CUDA graphs on a GPU) against eager in fp32, and the compiles and graphs of
    a run of mixed page lengths in fresh processes: a cold inductor cache, then the warm one it left."""
    model = str(ctx.model("head16"))
    common = ["-m", "tests.helpers.compile_run", model, "--device", ctx.device, "--dtype", "float32"]
    attentions = ["sdpa", "flex"]
    if ctx.dry:  # the GPU's loop policy on the CPU, shorter pages, one attention: the plumbing, not the numbers
        common += ["--schedule", "cuda", "--longest", "40"]
        attentions = ["sdpa"]
    started = time.perf_counter()
    eager = json.loads(ctx.python(*common, "--eager").stdout.splitlines()[-1])
    ctx.record(eager_seconds=eager["seconds"])
    runs = []
    for attention in attentions:
        cache = ctx.work / f"inductor-graphs-{attention}"
        shutil.rmtree(cache, ignore_errors=True)
        for state in ("cold", "warm"):
            got = json.loads(ctx.python(*common, "--attention", attention, cache=cache).stdout.splitlines()[-1])
            if got["compile_broken"]:
                raise RuntimeError(f"{attention}: the compiled step fell back to eager")
            logprobs = [abs(x - y) for a, b in zip(got["logprobs"], eager["logprobs"]) for x, y in zip(a, b)]
            runs.append({"attention": attention, "cache": state, "same_ids_as_eager": got["ids"] == eager["ids"],
                         "logprob_difference": max(logprobs, default=0.0),
                         **{k: got[k] for k in ("dynamo_graphs", "cuda_graphs", "cudagraph_skips", "seconds")}})
            ctx.record(runs=runs, seconds=round(time.perf_counter() - started, 1))
    bad = [r for r in runs if not r["same_ids_as_eager"] or r["dynamo_graphs"] != 1 or r["cudagraph_skips"]]
    if bad:
        raise RuntimeError(f"not one compile with eager's ids: {bad}")


def step_checkpoint(ctx: Context) -> None:
    """The full-size Kosmos-2.5 architecture with random weights, saved in bf16 on local disk (the
    throughput, first-page and batch-size steps read it)."""
    from benchmarks.throughput import build_checkpoint

    path = full_checkpoint(ctx)
    shutil.rmtree(path, ignore_errors=True)
    started = time.perf_counter()
    build_checkpoint(ctx.load.size, path, dtype="float32" if ctx.dry else "bfloat16")
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    ctx.record(size=ctx.load.size, gib=round(size / 2**30, 2), seconds=round(time.perf_counter() - started, 1))


def full_checkpoint(ctx: Context) -> Path:
    return ctx.work / "models" / "full"


def throughput(ctx: Context, systems: str, repeat: int = 1) -> None:
    """benchmarks/throughput.py on the full-size checkpoint, one system set, `repeat` timed rounds."""
    path = full_checkpoint(ctx)
    if not (path / "config.json").exists():
        raise RuntimeError("no full-size checkpoint: the checkpoint step did not run")
    result = ctx.work / "steps" / f"{ctx.step}-rows.json"
    load = ctx.load
    args = ["benchmarks/throughput.py", "--size", load.size, "--device", ctx.device, "--pages", str(load.pages),
            "--batch-size", str(load.batch), "--lengths", load.lengths, "--hf1-pages", str(load.hf1_pages),
            "--systems", systems, "--repeat", str(repeat), "--model-dir", str(path), "--json", str(result)]
    if ctx.dry:
        args += ["--compile", "off"]  # the dry run's one compile is the cuda_graphs step's
    started = time.perf_counter()
    ctx.python(*args, cache=ctx.work / "inductor")
    ctx.record(rows=json.loads(result.read_text())["rows"], seconds=round(time.perf_counter() - started, 1))
    result.unlink()


def step_kosmos(ctx: Context) -> None:
    """kosmos with SDPA (the CUDA default): pages/s, new tokens/s, peak memory, bandwidth fraction."""
    throughput(ctx, "kosmos-sdpa")


def step_kosmos_flex(ctx: Context) -> None:
    """kosmos with FlexAttention decoding (opt-in on CUDA until this says otherwise)."""
    throughput(ctx, "kosmos-flex")


def step_confidence_cost(ctx: Context) -> None:
    """What the tokens' log-probabilities cost: kosmos (SDPA) with and without them, 3 interleaved
    rounds; each row has the median and spread of its times."""
    throughput(ctx, "kosmos-sdpa,kosmos-unscored", repeat=3)


def step_transformers(ctx: Context) -> None:
    """transformers' generate() at batch 1 and batched, on the same pages and lengths."""
    throughput(ctx, "hf1,hfb")


def step_first_page(ctx: Context) -> None:
    """From `kosmos ocr page.png` starting to its first page on stdout, weights read from disk:
    with an empty inductor cache (the first run on a machine), then with the cache it left."""
    from benchmarks.throughput import synthetic_pages

    path = full_checkpoint(ctx)
    if not (path / "config.json").exists():
        raise RuntimeError("no full-size checkpoint: the checkpoint step did not run")
    page = ctx.work / "page.png"
    synthetic_pages(1, seed=3)[0].save(page)
    cache = ctx.work / "inductor-first-page"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache))
    command = [sys.executable, "-m", "kosmos_cli", "ocr", str(page), "--model", str(path), "-f", "jsonl",
               "--max-new-tokens", str(ctx.load.first_page_tokens), "--device", ctx.device]
    runs = []
    for state in ("cold", "warm"):
        dropped = drop_page_cache()
        started = time.perf_counter()
        with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as process:
            first = process.stdout.readline()
            first_at = time.perf_counter() - started
            _, err = process.communicate()
        if process.returncode != 0 or not first:
            raise RuntimeError(f"kosmos ocr exited {process.returncode}: {err[-1500:]}")
        runs.append({"cache": state, "page_cache_dropped": dropped, "first_page_s": round(first_at, 2),
                     "process_s": round(time.perf_counter() - started, 2),
                     "new_tokens": ctx.load.first_page_tokens, "log": err.strip().splitlines()[:1]})
        ctx.record(runs=runs)


def drop_page_cache() -> bool:
    """Ask the kernel to forget cached file pages (root only), so the weights come from the disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def step_auto_batch(ctx: Context) -> None:
    """auto_batch_size against the memory a batch of that size really takes (the 3.0 GiB admission
    reserve), and whether the out-of-memory back-off halved the slots (which would hide a reserve
    that is too small). The cache is sized for OCR's full budget; pages stop after a few tokens."""
    import torch

    import kosmos_cli
    from benchmarks.throughput import synthetic_pages
    from kosmos_cli.engine import Job
    from kosmos_cli.tasks import TASKS

    path = full_checkpoint(ctx)
    if not (path / "config.json").exists():
        raise RuntimeError("no full-size checkpoint: the checkpoint step did not run")
    engine = kosmos_cli.load(path, device=ctx.device)
    cuda = engine.device.type == "cuda"
    budget, prompt = TASKS["ocr"].max_new_tokens, "<ocr>"
    capped = engine.auto_batch_size(prompt, budget)
    slots = engine.auto_batch_size(prompt, budget, limit=1024)  # what memory alone allows
    weights = torch.cuda.memory_allocated(engine.device) if cuda else 0
    free_before = torch.cuda.mem_get_info(engine.device)[0] if cuda else 0
    ctx.record(default_batch=capped, memory_batch=slots, budget=budget, weights_gib=round(weights / 2**30, 2),
               reserve_gib=round(engine.admission_bytes(engine.prompt_length(prompt)) / 2**30, 2))
    tried = []
    stream = engine.stream

    def counting(jobs, *, slots, **options):
        tried.append(slots)
        return stream(jobs, slots=slots, **options)

    engine.stream = counting
    pages = synthetic_pages(min(slots, 8), seed=4)
    jobs = [Job(i, engine.prepare(pages[i % len(pages)]), prompt, 4, 4) for i in range(slots)]
    if cuda:
        torch.cuda.reset_peak_memory_stats(engine.device)
    started = time.perf_counter()
    done = sum(1 for _ in engine.stream_backing_off(jobs, slots=slots, max_prompt_tokens=engine.prompt_length(prompt),
                                                     max_new_tokens=budget))
    values = {"pages_done": done, "slots_tried": tried, "halved": len(tried) > 1,
              "seconds": round(time.perf_counter() - started, 1)}
    if cuda:
        total = torch.cuda.get_device_properties(engine.device).total_memory
        values |= {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(engine.device) / 2**30, 2),
                   "peak_reserved_gib": round(torch.cuda.max_memory_reserved(engine.device) / 2**30, 2),
                   "free_before_gib": round(free_before / 2**30, 2), "total_gib": round(total / 2**30, 2)}
    ctx.record(**values)


def step_bf16(ctx: Context) -> None:
    """bf16 against fp32, teacher-forced: both read the fp32 greedy ids, so every step compares the
    same context. Per-step top-1 agreement and the largest logit difference."""
    import kosmos_cli
    from kosmos_cli.processing.images import kosmos2_5_patches
    from tests.helpers.images import noise_image
    from tests.helpers.parity import SHAPES, full_forward

    model = ctx.model("head16")
    fp32 = kosmos_cli.load(model, device=ctx.device, dtype="float32", compile=False)
    bf16 = kosmos_cli.load(model, device=ctx.device, dtype="bfloat16", compile=False)
    images = [noise_image(*shape, seed=i) for i, shape in enumerate(SHAPES)]
    generated = fp32.generate(images, "<ocr>", max_new_tokens=ctx.load.bf16_tokens)
    steps = agree = 0
    largest = 0.0
    for image, ids in zip(images, generated):
        prompt, mask = fp32.tokenizer.prompt("<ocr>", fp32.config.latent_query_num)
        patches = kosmos2_5_patches(image, fp32.image_processor.max_patches).patches[None]
        sequence, masks = [prompt + ids], [mask + [0] * len(ids)]
        # The logits at position p predict token p + 1: the last prompt position predicts the first new id.
        rows = slice(len(prompt) - 1, len(prompt) - 1 + len(ids))
        exact = full_forward(fp32, patches, sequence, masks)[0, rows].float()
        half = full_forward(bf16, patches, sequence, masks)[0, rows].float()
        steps += len(ids)
        agree += int((half.argmax(-1) == exact.argmax(-1)).sum())
        largest = max(largest, float((half - exact).abs().max()) if ids else 0.0)
    ctx.record(steps=steps, top1_agreement=round(agree / max(steps, 1), 4), max_logit_difference=round(largest, 4),
               images=len(images), note="random tiny weights: near-ties are common, so this bounds the rounding, "
                                         "it does not predict agreement on the released weights")


def step_gpu_tests(ctx: Context) -> None:
    """The tests marked gpu, by explicit test ids (on the CPU they collect and skip)."""
    listed = ctx.python("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu", *GPU_TEST_FILES)
    ids = [line for line in listed.stdout.splitlines() if "::" in line]
    ctx.record(test_ids=ids)
    report = ctx.work / "steps" / "gpu-tests.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                           f"--junitxml={report}", *ids], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    failures = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    ctx.record(summary=summary, failures=failures, exit_code=done.returncode)
    if done.returncode != 0:
        raise RuntimeError(f"pytest: {summary}")


GPU_TEST_FILES = ["tests/test_gpu.py"]


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Context], None]
    gpu_s: int  # expected seconds on an H100, the budget plans with these
    dry_s: int  # and in the dry run


# In order of value: what a short run must not miss comes first.
STEPS = [
    Step("environment", step_environment, 45, 15),
    Step("cuda_graphs", step_cuda_graphs, 150, 60),
    Step("checkpoint", step_checkpoint, 45, 10),
    Step("kosmos", step_kosmos, 100, 30),
    Step("first_page", step_first_page, 100, 25),
    Step("kosmos_flex", step_kosmos_flex, 100, 30),
    Step("transformers", step_transformers, 120, 25),
    Step("auto_batch", step_auto_batch, 60, 15),
    Step("bf16", step_bf16, 30, 15),
    Step("confidence_cost", step_confidence_cost, 150, 30),
    Step("gpu_tests", step_gpu_tests, 150, 30),
]
BY_NAME = {step.name: step for step in STEPS}
THROUGHPUT_STEPS = ("kosmos", "kosmos_flex", "transformers", "confidence_cost")


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="results.json, results.md and steps.log")
    parser.add_argument("--work", type=Path, default=None, help="large files (default: a folder in /tmp)")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all steps together")
    parser.add_argument("--wheels", type=Path, default=None, help="a folder of wheels to install first")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny models")
    parser.add_argument("--steps", default=None, help="only these steps, comma-separated: " + ",".join(BY_NAME))
    parser.add_argument("--make-wheels", type=Path, default=None, metavar="DIR",
                        help="download the pinned wheels into DIR (for the GPU machine's Python 3.12, or --python local)")
    parser.add_argument("--python", default="3.12", help="with --make-wheels: 3.12 (the GPU machine) or local")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # internal: run one step here
    args = parser.parse_args()
    if args.make_wheels:
        sys.exit(make_wheels(args.make_wheels, args.python))
    if args.step:
        run_step(args)
    elif args.out is None:
        parser.error("--out is required")
    else:
        drive(args)


def drive(args) -> None:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path("/tmp/kosmos-gpu-check")).resolve()
    shutil.rmtree(work / "steps", ignore_errors=True)  # what an earlier check measured is not this one's
    (work / "steps").mkdir(parents=True)
    (out / "steps.log").unlink(missing_ok=True)
    started = time.monotonic()
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": args.budget, "dry_run": args.dry_run,
            "host": platform.node(), "wheels": install_wheels(args.wheels, work, args.dry_run)}
    chosen = [BY_NAME[name] for name in args.steps.split(",")] if args.steps else STEPS
    status: dict[str, dict] = {}
    for step in chosen:
        left = args.budget - (time.monotonic() - started)
        need = step.dry_s if args.dry_run else step.gpu_s
        if need > left:
            status[step.name] = {"status": "skipped", "why": f"needs ~{need} s, {max(left, 0):.0f} s left"}
            write_results(out, work, meta, status)
            continue
        # Twice its estimate where the budget allows: estimates are guesses until the first real run.
        # Four times in the dry run, which proves the plumbing on whatever CPU runs the tests.
        timeout = max(min((4 if args.dry_run else 2) * need, left), 1)
        print(f"gpu_check: {step.name} (~{need} s, at most {timeout:.0f} s)", file=sys.stderr, flush=True)
        command = [sys.executable, str(Path(__file__).resolve()), "--step", step.name, "--work", str(work)] + \
            (["--dry-run"] if args.dry_run else [])
        begin = time.monotonic()
        log = work / "steps" / f"{step.name}.log"
        with open(log, "w") as output:
            state = run_with_timeout(command, timeout, env=child_env(work), stdout=output)
        status[step.name] = {"status": state, "seconds": round(time.monotonic() - begin, 1)}
        if state != "ok":
            status[step.name]["why"] = last_error(log)
        with open(out / "steps.log", "a") as logs:
            logs.write(f"===== {step.name}: {state} =====\n{log.read_text(errors='replace')}\n")
        write_results(out, work, meta, status)
        print(f"gpu_check: {step.name}: {state} in {status[step.name]['seconds']} s", file=sys.stderr, flush=True)
    meta["total_s"] = round(time.monotonic() - started, 1)
    write_results(out, work, meta, status)
    failed = [name for name, s in status.items() if s["status"] in ("failed", "timed out")]
    print((out / "results.md").read_text(), end="")
    sys.exit(1 if failed else 0)


def run_with_timeout(command: list[str], timeout: float, **popen) -> str:
    """"ok", "failed" or "timed out": a step that runs over is ended with every process it started
    (its own process group), so that nothing it left holds the GPU during the next step."""
    with subprocess.Popen(command, cwd=ROOT, stderr=subprocess.STDOUT, start_new_session=True, **popen) as process:
        try:
            return "ok" if process.wait(timeout=timeout) == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return "timed out"


def run_step(args) -> None:
    """Inside a step's own process."""
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    ctx = Context(work=args.work, dry=args.dry_run, device=device, load=DRY if args.dry_run else GPU, step=args.step)
    (args.work / "steps" / f"{args.step}.json").unlink(missing_ok=True)
    BY_NAME[args.step].run(ctx)


def child_env(work: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"),
               HF_HUB_OFFLINE="1")
    boot = str(work / "boot")
    env["PYTHONPATH"] = os.pathsep.join([boot, str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def install_wheels(wheels: Path | None, work: Path, dry: bool) -> dict:
    """Install the carried wheels into WORK/site and write WORK/boot/sitecustomize.py, which every
    step's Python (and the processes it starts) runs at start-up: it appends WORK/site after the
    machine's own packages and, in the dry run, hides the packages the GPU machine lacks."""
    site, boot = work / "site", work / "boot"
    shutil.rmtree(site, ignore_errors=True)
    boot.mkdir(parents=True, exist_ok=True)
    installed: list[str] = []
    if wheels is not None:
        files = sorted(str(p) for p in wheels.glob("*.whl"))
        if files:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--disable-pip-version-check", "--target", str(site), *files], check=True)
            installed = [Path(f).name for f in files]
    hidden = ABSENT_THERE if dry else []
    (boot / "sitecustomize.py").write_text(SITECUSTOMIZE.format(site=str(site), boot=str(boot), hidden=hidden))
    return {"installed": installed, "target": str(site), "hidden_as_on_the_gpu_machine": hidden}


SITECUSTOMIZE = '''\
"""Written by benchmarks/gpu_check.py: carried wheels go after the machine's own packages."""
import importlib.machinery
import importlib.util
import sys

sys.path.append({site!r})
HIDDEN = {hidden!r}


# Packages the GPU machine does not have are absent in the dry run too: None in sys.modules makes
# `import` fail and importlib.util.find_spec answer None, as for a package that is not installed.
for _name in HIDDEN:
    sys.modules.setdefault(_name, None)
# The machine's own sitecustomize, if any, still runs.
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [p for p in sys.path if p != {boot!r}])
if _spec is not None and _spec.loader is not None:
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
'''


def last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


def write_results(out: Path, work: Path, meta: dict, status: dict[str, dict]) -> None:
    """OUT/results.json and OUT/results.md from each step's status and what it measured."""
    steps = {}
    for name, state in status.items():
        path = work / "steps" / f"{name}.json"
        steps[name] = state | {"measured": json.loads(path.read_text()) if path.exists() else {}}
    (out / "results.json").write_text(json.dumps({"meta": meta, "steps": steps}, indent=1, default=str))
    tmp = out / "results.md.tmp"
    tmp.write_text(markdown(meta, steps))
    tmp.replace(out / "results.md")


def markdown(meta: dict, steps: dict[str, dict]) -> str:
    env = steps.get("environment", {}).get("measured", {})
    lines = ["# GPU check" + (" (dry run: CPU, tiny models)" if meta.get("dry_run") else ""), ""]
    where = (f"{env['gpu']}, {env['gpu_memory_gib']} GiB, {env['capability']}" if "gpu" in env
             else f"device {env.get('device', '?')}")
    lines.append(f"{where}; torch {env.get('torch', '?')}, CUDA {env.get('cuda')}, "
                 f"Triton {env.get('triton', '?')}, transformers {env.get('transformers', '?')} (the machine's: "
                 f"the oracle), Python {env.get('python', '?')}; {meta['started']}; budget {meta['budget_s']:.0f} s"
                 + (f", took {meta['total_s']} s" if "total_s" in meta else ""))
    lines.append("")
    if env and not env.get("compile_ok"):
        lines += ["**torch.compile does not work on this machine: every compiled number below is eager "
                  f"({env.get('compile_error', 'wrong result or extra graphs')}).**", ""]
    if env:
        lines += [f"auto picks {env.get('auto_dtype')} and {env.get('auto_decode_attention')} decoding; flash-attn: "
                  f"{'installed' if env.get('flash_attn') else 'not installed, its path is unmeasured'}; "
                  f"wheels carried: {', '.join(meta['wheels']['installed']) or 'none'}", ""]
    lines += ["| step | status | seconds | result |", "|---|---|---|---|"]
    for name, step in steps.items():
        lines.append(f"| {name} | {step['status']} | {step.get('seconds', '')} | "
                     f"{step.get('why', '') or summary(name, step['measured'])} |")
    rows = [row for name in THROUGHPUT_STEPS for row in steps.get(name, {}).get("measured", {}).get("rows", [])]
    if rows:
        lines += ["", "| system | pages | batch | pages/s | new tokens/s | peak GPU GiB | bandwidth fraction | "
                  "median s | spread s |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['system']} | {r['pages']} | {r['batch']} | {r['pages_per_s']} | {r['new_tokens_per_s']} | "
                  f"{r.get('peak_gpu_gib', '–')} | {r.get('bandwidth_fraction', '–')} | {r.get('median_s', '–')} | "
                  f"{r.get('spread_s', '–')} |" for r in rows]
    runs = steps.get("cuda_graphs", {}).get("measured", {}).get("runs", [])
    if runs:
        lines += ["", "| attention | inductor cache | dynamo graphs | CUDA graphs | skips | ids = eager | "
                  "log-prob diff (nats) | s |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['attention']} | {r['cache']} | {r['dynamo_graphs']} | {r['cuda_graphs']} | "
                  f"{r['cudagraph_skips']} | {r['same_ids_as_eager']} | {r['logprob_difference']:.2g} | "
                  f"{r['seconds']} |" for r in runs]
    return "\n".join(lines) + "\n"


def summary(name: str, m: dict) -> str:
    """One cell: the step's headline numbers."""
    if not m:
        return ""
    if name == "environment":
        return f"compile works: {m.get('compile_ok')}"
    if name == "cuda_graphs":
        return "; ".join(f"{r['attention']} {r['cache']}: {r['dynamo_graphs']} compile(s), {r['cuda_graphs']} CUDA "
                         f"graphs, ids {'=' if r['same_ids_as_eager'] else '≠'} eager" for r in m.get("runs", []))
    if name == "checkpoint":
        return f"{m.get('size')}, {m.get('gib')} GiB"
    if name in THROUGHPUT_STEPS:
        return "; ".join(f"{r['system']} {r['pages_per_s']} pages/s" for r in m.get("rows", []))
    if name == "first_page":
        return "; ".join(f"{r['cache']} cache: first page at {r['first_page_s']} s" for r in m.get("runs", []))
    if name == "auto_batch":
        text = f"auto {m.get('default_batch')} (memory allows {m.get('memory_batch')}), slots tried {m.get('slots_tried')}"
        if "peak_reserved_gib" in m:
            text += f", peak {m['peak_reserved_gib']} of {m['total_gib']} GiB"
        return text
    if name == "bf16":
        return f"top-1 {m.get('top1_agreement')} over {m.get('steps')} steps, max logit diff {m.get('max_logit_difference')}"
    if name == "gpu_tests":
        return m.get("summary", "")
    return ""


# --------------------------------------------------------------------------------------------------
# Wheels
# --------------------------------------------------------------------------------------------------


def make_wheels(folder: Path, python: str) -> int:
    """Download WHEELS for the GPU machine (CPython 3.12, manylinux x86-64) or this interpreter, print
    their names and sizes, check the total against what a call carries, and prove that the set
    installs on its own (no index, no other wheel) for that Python."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([*PIP, "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(folder),
                    *pip_target(python), *WHEELS], check=True)
    total = 0
    for wheel in sorted(folder.glob("*.whl")):
        total += wheel.stat().st_size
        print(f"{wheel.name}\t{wheel.stat().st_size:,} bytes")
    print(f"total\t{total:,} bytes (limit {WHEEL_BUDGET:,})")
    resolves = wheels_resolve(folder, python)
    print(f"resolves for Python {python} from these wheels alone: {'yes' if resolves else 'NO'}")
    return 0 if total <= WHEEL_BUDGET and resolves else 1


PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


def pip_target(python: str) -> list[str]:
    """pip's options for the wheels of another interpreter (none for this one)."""
    if python == "local":
        return []
    return ["--python-version", python, "--implementation", "cp", "--abi", f"cp{python.replace('.', '')}",
            *(f"--platform={p}" for p in WHEEL_PLATFORMS)]


def wheels_resolve(folder: Path, python: str) -> bool:
    """Whether pip, with no index and only `folder`, could install WHEELS for that Python."""
    scratch = folder / ".resolve"
    proof = subprocess.run([*PIP, "install", "-q", "--dry-run", "--ignore-installed", "--no-index",
                            "--only-binary=:all:", "--find-links", str(folder), "--target", str(scratch),
                            *pip_target(python), *WHEELS], capture_output=True, text=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return proof.returncode == 0


if __name__ == "__main__":
    main()
