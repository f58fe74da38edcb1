"""`kosmos serve` under load, against a run of the command's library call over the same pages.

    python benchmarks/serving.py --pages 32 --clients 16 --slots 4 --tokens 256   # CPU, the small model

Builds (or reuses, --model-dir) the `small` random Kosmos-2.5 of throughput.py, writes synthetic
pages as PNG files, then measures, on one engine each, with the same slots and the same page budget
(random weights write to the budget: every page gets --tokens new tokens):

- run: the command's pipeline (`pipeline.transcribe`) over the pages on a loaded engine: pages/s;
- serve: a `kosmos serve` process on 127.0.0.1 and --clients threads here, each sending
  one-page requests back to back, half <ocr> and half <md>: pages/s, request latency p50/p95/p99;
- first record: a warm server's time from request to its first record for one page, against a cold
  `kosmos ocr` process's time from start to its first page on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for benchmarks.throughput and tests.helpers

from benchmarks.throughput import build_checkpoint, synthetic_pages  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=32)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256, help="new tokens a page")
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse a checkpoint built earlier")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kosmos-serving-"))
    model = args.model_dir or work / "model"
    if not (model / "config.json").exists():
        print(f"building the small checkpoint in {model} ...", file=sys.stderr)
        build_checkpoint("small", model)
    files = []
    for i, image in enumerate(synthetic_pages(args.pages, seed=2)):
        files.append(work / f"page{i:03d}.png")
        image.save(files[-1])
    results = {"run": run(model, files, args), "serve": served(model, files, args)}
    results["first_record"] = first_record(model, files[0], args)
    for name, row in results.items():
        print(json.dumps({"what": name, **row}), flush=True)
    results["serve"]["vs_run"] = round(results["serve"]["pages_per_s"] / results["run"]["pages_per_s"], 3)
    print(f"serve / run: {results['serve']['vs_run']:.2f}x pages/s")
    if args.json:
        meta = {"date": time.strftime("%Y-%m-%d"), "args": {k: str(v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps({"meta": meta, **results}, indent=1))


def run(model: Path, files: list[Path], args) -> dict:
    """The command's pipeline (`pipeline.transcribe`) on a loaded engine, ocr pages then md pages."""
    from kosmos_cli import load
    from kosmos_cli.pages import iter_pages
    from kosmos_cli.pipeline import transcribe
    from kosmos_cli.tasks import TASKS

    engine = load(str(model), device="cpu", compile=False)
    list(transcribe(engine, TASKS["ocr"], iter_pages(files[:1]), batch_size=args.slots, max_new_tokens=4))  # warm-up
    started = time.perf_counter()
    for task, half in (("ocr", files[0::2]), ("md", files[1::2])):
        for _, result in transcribe(engine, TASKS[task], iter_pages(half), batch_size=args.slots,
                                    max_new_tokens=args.tokens):
            assert result is not None and result.new_tokens == args.tokens
    seconds = time.perf_counter() - started
    return {"pages": len(files), "seconds": round(seconds, 2), "pages_per_s": round(len(files) / seconds, 3)}


def served(model: Path, files: list[Path], args) -> dict:
    """--clients threads here, one-page requests back to back, against a `kosmos serve` process."""
    import httpx

    with _server(model, args, "--batch-size", str(args.slots), "--keep-results", "0", "--max-queue", "1000") as url:
        todo = list(enumerate(files))
        lock, latencies = threading.Lock(), []

        def client():
            with httpx.Client(timeout=600) as http:
                while True:
                    with lock:
                        if not todo:
                            return
                        i, path = todo.pop(0)
                    began = time.perf_counter()
                    with open(path, "rb") as f:
                        response = http.post(f"{url}/v1/{'ocr' if i % 2 == 0 else 'md'}",
                                             files={"file": (path.name, f)}, data={"max_new_tokens": str(args.tokens)})
                    assert response.status_code == 200 and json.loads(response.text)["new_tokens"] == args.tokens
                    with lock:
                        latencies.append(time.perf_counter() - began)

        started = time.perf_counter()
        clients = [threading.Thread(target=client) for _ in range(args.clients)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        seconds = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100)
    return {"pages": len(files), "clients": args.clients, "seconds": round(seconds, 2),
            "pages_per_s": round(len(files) / seconds, 3), "latency_p50_s": round(q[49], 2),
            "latency_p95_s": round(q[94], 2), "latency_p99_s": round(q[98], 2)}


@contextlib.contextmanager
def _server(model: Path, args, *options: str):
    """A `kosmos serve` process on a free port, healthy (warmed up); yields its URL."""
    from tests.helpers.server import start_server

    server, url = start_server("--model", model, "--device", "cpu", "--max-new-tokens", args.tokens, "-q", *options,
                               command=(sys.executable, "-m", "kosmos_cli"))
    try:
        yield url
    finally:
        server.terminate()
        server.wait(60)


def first_record(model: Path, page: Path, args) -> dict:
    """A cold `kosmos ocr` process to its first page on stdout, against a warm server's first record."""
    import httpx

    command = [sys.executable, "-m", "kosmos_cli", "ocr", str(page), "--model", str(model), "--device", "cpu",
               "--max-new-tokens", str(args.tokens), "-f", "jsonl", "-q"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    process.stdout.readline()
    cold = time.perf_counter() - started
    process.wait()

    with _server(model, args) as url:
        started = time.perf_counter()
        with open(page, "rb") as f, httpx.stream("POST", f"{url}/v1/ocr", files={"file": (page.name, f)},
                                                  data={"max_new_tokens": str(args.tokens)}, timeout=600) as answer:
            next(answer.iter_lines())
        warm = time.perf_counter() - started
    return {"cold_command_s": round(cold, 2), "warm_server_s": round(warm, 2)}


if __name__ == "__main__":
    main()
