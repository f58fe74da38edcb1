"""Kosmos-2.5 throughput: kosmos against transformers on the same weights, pages and output lengths.

    python benchmarks/throughput.py --size full --pages 64 --batch-size 32     # one GPU
    python benchmarks/throughput.py --size small --device cpu                 # overhead check on CPU

Builds a Kosmos-2.5 with random weights in the Hub layout (no download; `full` is the released
architecture, 1.37 B parameters; `small` a toy one), then runs the same synthetic pages through
  (a) transformers generate(), batch 1, sdpa (the model card's recipe),
  (b) transformers generate(), batched (every row runs to the batch's longest page),
  (c) kosmos, continuous batching (kosmos-sdpa, kosmos-flex: its decode attention forced to one kernel).
Per-page output lengths are forced (min = max new tokens, drawn from --lengths) so that every system
produces exactly the same useful tokens; tokens/s counts those. Every system is loaded and warmed up
first, then the timed runs take turns (--repeat rounds) with the device synchronised. Needs the test
extra (transformers) and runs from the repo root.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers

from kosmos_cli.engine import pick_dtype  # noqa: E402

SIZES = {
    "full": {},  # the released configuration (transformers' defaults)
    "small": dict(
        text_config=dict(embed_dim=256, layers=4, attention_heads=4, ffn_dim=1024),
        vision_config=dict(hidden_size=128, intermediate_size=256, head_dim=32, num_hidden_layers=2,
                           num_attention_heads=4, max_num_patches=256),
        latent_query_num=64,
    ),
}
# kosmos systems and their attention choice (load(attention=...)): the default, and the compiled decode step's attention
# forced to SDPA or to FlexAttention (see kosmos_cli/models/layers.py); kosmos-unscored is the default without the
# tokens' log-probabilities (generation.SCORE_TOKENS), to measure what the confidence costs.
KOSMOS_SYSTEMS = {"kosmos": "auto", "kosmos-sdpa": "sdpa", "kosmos-flex": "flex", "kosmos-unscored": "auto"}
# Peak HBM bandwidth, bytes/s, by a part of the device name (first match wins).
GPU_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "H200": 4.8e12}


def build_checkpoint(size: str, path: Path, dtype: str = "float32") -> Path:
    """Random Kosmos-2.5 weights + tokenizer + preprocessor config, saved like the Hub repo (weights
    made on the GPU where there is one; saved in `dtype`: bfloat16 halves the full size's 5.5 GB)."""
    from transformers import Kosmos2_5Config, Kosmos2_5ForConditionalGeneration

    from tests.helpers.kosmos2_5 import write_kosmos2_5_tokenizer

    vocab = write_kosmos2_5_tokenizer(path)
    kwargs = json.loads(json.dumps(SIZES[size]))
    if size == "small":
        kwargs["text_config"]["vocab_size"] = vocab
    config = Kosmos2_5Config(**kwargs)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Kosmos2_5ForConditionalGeneration(config)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    max_patches = config.vision_config.max_num_patches
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Kosmos2_5ImageProcessor", "max_patches": max_patches,
         "patch_size": {"height": 16, "width": 16}, "do_normalize": True, "do_convert_rgb": True}))
    return path


def synthetic_pages(n: int, seed: int) -> list[Image.Image]:
    """Letter-sized pages at ~100 dpi with lines of text, a few sizes."""
    rng = random.Random(seed)
    pages = []
    for i in range(n):
        w, h = rng.choice([(850, 1100), (1100, 850), (800, 1200)])
        page = Image.new("RGB", (w, h), "white")
        draw = ImageDraw.Draw(page)
        for y in range(40, h - 40, 28):
            draw.text((40, y), " ".join(str(rng.randint(0, 99999)) for _ in range(8)), fill="black")
        pages.append(page)
    return pages


def timed(fn, device: str) -> float:
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def run_transformers(model_dir: Path, batch: int, device: str, dtype):
    from tests.helpers.kosmos2_5 import load_kosmos2_5_processor
    from transformers import Kosmos2_5ForConditionalGeneration

    model = Kosmos2_5ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    processor = load_kosmos2_5_processor(model_dir)

    def go(pages, lengths):
        for i in range(0, len(pages), batch):
            chunk, n = pages[i : i + batch], max(lengths[i : i + batch])
            inputs = processor(text=["<ocr>"] * len(chunk), images=chunk, return_tensors="pt")
            inputs.pop("width"), inputs.pop("height")
            inputs = {k: v.to(device) for k, v in inputs.items()}
            inputs["flattened_patches"] = inputs["flattened_patches"].to(dtype)
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    return go


def run_kosmos(model_dir: Path, batch: int, device: str, dtype, compile: str, attention: str, scored: bool = True):
    import kosmos_cli
    from kosmos_cli.models import generation

    engine = kosmos_cli.load(model_dir, device=device, dtype=dtype, compile={"on": True, "off": False}.get(compile, "auto"),
                             attention=attention)

    def go(pages, lengths):
        generation.SCORE_TOKENS = scored  # systems take turns: each sets it for its own runs
        engine.run(pages, "<ocr>", max_new_tokens=lengths, min_new_tokens=lengths, batch_size=batch)

    return go, engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on Ampere and newer GPUs, float16 on older ones, "
                        "float32 on the CPU), bfloat16/bf16, float16/fp16, float32/fp32")
    parser.add_argument("--pages", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lengths", default="50-2000", help="per-page new tokens, uniform in LO-HI (or one number)")
    parser.add_argument("--systems", default="hf1,hfb,kosmos",
                        help="which of hf1, hfb, kosmos, kosmos-sdpa, kosmos-flex, kosmos-unscored to run")
    parser.add_argument("--hf1-pages", type=int, default=None, help="pages for transformers batch 1 (it is slow)")
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse a checkpoint built earlier")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="kosmos' compiled decode step (auto: on CUDA only); warm-up includes compiling")
    parser.add_argument("--repeat", type=int, default=1,
                        help="timed rounds (each runs every system once, in turn); each system's best is reported, "
                             "and with several rounds the median and the spread (max - min) of its times")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    cuda = args.device.startswith("cuda")
    dtype = pick_dtype(args.dtype, torch.device(args.device))
    lo, _, hi = args.lengths.partition("-")
    rng = random.Random(1)
    lengths = [rng.randint(int(lo), int(hi or lo)) for _ in range(args.pages)]
    pages = synthetic_pages(args.pages, seed=2)
    model_dir = args.model_dir or Path(tempfile.mkdtemp(prefix="kosmos-bench-"))
    if not (model_dir / "config.json").exists():
        print(f"building a random {args.size} checkpoint in {model_dir} ...", file=sys.stderr)
        build_checkpoint(args.size, model_dir)

    # Every system is loaded and warmed up first; then the timed runs take turns (round r times each
    # system once), so a machine whose speed drifts between runs (a shared VM) slows all alike.
    systems = {}
    for system in args.systems.split(","):
        n = args.hf1_pages if system == "hf1" and args.hf1_pages else args.pages
        before = allocated(args.device)
        if system in KOSMOS_SYSTEMS:
            attention = KOSMOS_SYSTEMS[system]
            # FlexAttention is only fast compiled: "auto" compiles it on the CPU too (off: a plumbing check).
            compile = "on" if attention == "flex" and args.compile == "auto" else args.compile
            go, engine = run_kosmos(model_dir, args.batch_size, args.device, dtype, compile, attention,
                                    scored=system != "kosmos-unscored")
        else:
            go, engine = run_transformers(model_dir, 1 if system == "hf1" else args.batch_size, args.device, dtype), None
        # A compiled kosmos warms up on the whole timed workload: that compiles the step, records a
        # CUDA graph for every (slots, span) shape the timed run meets and sizes the kept KV cache.
        # The others run a few pages (several batch shapes and the longest page).
        if engine is not None and engine.compiled is not None:
            go(pages[:n], lengths[:n])
        else:
            warm = [8, max(lengths), 40, 16][: len(pages)]
            go(pages[: len(warm)], warm)
        if engine is not None and engine.compiled is not None and engine.compiled.broken:
            sys.exit(f"{system}: torch.compile of the decode step failed (see the warning above)")
        # What stays allocated between runs (weights, a kept cache), counted in this system's peak.
        systems[system] = dict(go=go, engine=engine, pages=n, resident=allocated(args.device) - before)

    times = {system: [] for system in systems}
    peak = dict.fromkeys(systems, 0)
    for _ in range(args.repeat):
        for system, s in systems.items():
            n, base = s["pages"], allocated(args.device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(args.device)
            times[system].append(timed(lambda: s["go"](pages[:n], lengths[:n]), args.device))
            if cuda:
                peak[system] = max(peak[system], torch.cuda.max_memory_allocated(args.device) - base + s["resident"])

    seconds = {system: min(t) for system, t in times.items()}
    rows = []
    bandwidth = peak_bandwidth(args.device)
    for system, s in systems.items():
        n, engine, tokens = s["pages"], s["engine"], sum(lengths[: s["pages"]])
        name = system + ("+compile" if engine is not None and engine.compiled is not None else "")
        row = {"system": name, "pages": n, "batch": 1 if system == "hf1" else args.batch_size,
               "seconds": round(seconds[system], 2), "pages_per_s": round(n / seconds[system], 3),
               "new_tokens_per_s": round(tokens / seconds[system], 1)}
        if args.repeat > 1:
            row |= {"median_s": round(statistics.median(times[system]), 3),
                    "spread_s": round(max(times[system]) - min(times[system]), 3)}
        if cuda:
            row["peak_gpu_gib"] = round(peak[system] / 2**30, 1)
        if system in KOSMOS_SYSTEMS and bandwidth:
            row["bandwidth_fraction"] = round(bandwidth_fraction(engine, row["new_tokens_per_s"], args.batch_size,
                                                                 sum(lengths) / len(lengths), bandwidth), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)

    by = {r["system"].split("+")[0]: r for r in rows}
    for ours in KOSMOS_SYSTEMS:
        for base in ("hf1", "hfb"):
            if ours in by and base in by:
                print(f"{ours} / {base}: {by[ours]['pages_per_s'] / by[base]['pages_per_s']:.2f}x pages/s")
    meta = {"device": torch.cuda.get_device_name(args.device) if cuda else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "args": vars(args) | {"model_dir": str(model_dir), "json": None}}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))


def allocated(device: str) -> int:
    """Bytes the device's caching allocator holds for tensors now (0 off CUDA)."""
    return torch.cuda.memory_allocated(torch.device(device)) if device.startswith("cuda") else 0


def peak_bandwidth(device: str) -> float | None:
    """The GPU's memory bandwidth in bytes/s from its name (None when unknown, e.g. the CPU)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((b for key, b in GPU_BANDWIDTH.items() if key in name), None)


def bandwidth_fraction(engine, tokens_per_s: float, batch: int, mean_new: float, bandwidth: float) -> float:
    """Fraction of the memory bandwidth implied by the decode rate: every step reads the decoder
    weights once for the whole batch, plus each sequence's KV cache (prompt + half its output)."""
    decoder = engine.model.text
    weight_bytes = sum(p.numel() * p.element_size() for p in decoder.parameters())
    if decoder.lm_head is not None:  # untied: the token embedding is only gathered, k rows a step
        weight_bytes -= decoder.embed_tokens.weight.numel() * decoder.embed_tokens.weight.element_size()
    layers, dim = len(decoder.layers), decoder.dim
    kv_bytes_per_token = layers * 2 * dim * torch.finfo(engine.dtype).bits // 8
    context = engine.prompt_length("<ocr>") + mean_new / 2
    bytes_per_token = weight_bytes / batch + kv_bytes_per_token * context
    return tokens_per_s * bytes_per_token / bandwidth


if __name__ == "__main__":
    main()
