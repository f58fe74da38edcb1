"""One engine's run of a fixed workload in a fresh process: the ids and their log-probabilities, the
dynamo graphs compiled and the CUDA graphs recorded, as one JSON object on stdout.

    python -m tests.helpers.compile_run MODEL_DIR --device cpu --schedule cuda --attention flex

A fresh process is the only honest way to count compiles with a cold or a warm inductor cache: the
caller picks the cache with TORCHINDUCTOR_CACHE_DIR and runs this twice. The workload drains a
continuous batch of varied prompts and budgets (rows in use fall from 3 to 1), then forces pages
long enough to cross several span buckets of either schedule, then runs two slots and one image:
every shape change a real run makes, for one compile."""

from __future__ import annotations

import argparse
import json
import time

from tests.helpers.images import noise_image

SIZES = [(40, 30), (300, 120), (64, 640), (128, 128), (90, 200), (33, 33), (250, 80)]
# The chat prompts are built by processing.kosmos2_5.chat_prompt (see prompts()).
PROMPTS = ["<ocr>", "<md>", ("chat", "Total?"), "<ocr>", "<md>", "<ocr>", ("chat", "Who signed it?")]
LIMITS = [30, 3, 17, 1, 40, 0, 9]
# Forced lengths: the third page ends past span 256 (prompt 20 + 300), beyond a FlexAttention mask
# of two 128-key blocks and the first CUDA span bucket.
LONGER = [70, 3, 300, 9]


def images():
    return [noise_image(*size, seed=i) for i, size in enumerate(SIZES)]


def prompts() -> list[str]:
    from kosmos_cli.processing.kosmos2_5 import chat_prompt

    return [chat_prompt(p[1]) if isinstance(p, tuple) else p for p in PROMPTS]


def run(engine, longest: int = LONGER[2]) -> list:
    """The workload's outputs, in the order: the draining run, the longer pages, two slots, one image.
    `longest` shortens the longest page (the GPU check's dry run, which proves plumbing, not shapes)."""
    ims, texts = images(), prompts()
    longer = [min(n, longest) for n in LONGER]
    outputs = engine.run(ims, texts, LIMITS, batch_size=3)
    outputs += engine.run(ims[:4], "<ocr>", longer, min_new_tokens=longer, batch_size=3)
    outputs += engine.run(ims[:2], texts[:2], LIMITS[:2], batch_size=2)
    outputs += engine.run(ims[:1], texts[:1], LIMITS[:1])
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--schedule", choices=["device", "cpu", "cuda"], default="device",
                        help="the decode loop's schedule: the device's own, or the CPU's or CUDA's forced")
    parser.add_argument("--eager", action="store_true", help="no torch.compile (the reference ids)")
    parser.add_argument("--longest", type=int, default=LONGER[2], help="cap on the forced page lengths")
    args = parser.parse_args()

    started = time.perf_counter()
    import torch
    from torch._dynamo.utils import counters

    import kosmos_cli
    from kosmos_cli.models import generation

    if args.schedule != "device":
        forced = generation.CUDA_SCHEDULE if args.schedule == "cuda" else generation.CPU_SCHEDULE
        generation.schedule_for = lambda device: forced
    if args.dtype == "float32":  # exact fp32 on the GPU too: no TF32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    captures = []  # every CUDA graph recorded goes through CUDAGraph.capture_begin
    if torch.cuda.is_available():
        begin = torch.cuda.CUDAGraph.capture_begin
        torch.cuda.CUDAGraph.capture_begin = lambda graph, *a, **k: (captures.append(1), begin(graph, *a, **k))[1]
    engine = kosmos_cli.load(args.model, device=args.device, dtype=args.dtype, compile=not args.eager,
                             attention=args.attention)
    outputs = run(engine, args.longest)
    print(json.dumps({
        "ids": [out.ids for out in outputs],
        "logprobs": [out.logprobs for out in outputs],
        "dynamo_graphs": counters["stats"]["unique_graphs"],
        "cuda_graphs": len(captures),
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
        "compile_broken": engine.compiled.broken if engine.compiled is not None else None,
        "flex": engine.compiled.flex if engine.compiled is not None else False,
        "seconds": round(time.perf_counter() - started, 2),
    }))


if __name__ == "__main__":
    main()
