"""Ray actors' decode slots: how many sit idle, on a local CPU cluster with the tiny test model.

    python benchmarks/ray_slots.py                        # 2 actors, 4 slots, 96 pages in 4 PDFs, as --ray runs
    python benchmarks/ray_slots.py --via dataset --pages-per-call 4,64 --json out.json

Runs `transcribe_on_ray` (the CLI's --ray) or `transcribe_dataset` over --files PDFs of --pages pages in
all, once per --pages-per-call value, each on a fresh actor pool. Each page's output length is forced (min = max new tokens, drawn log-uniformly from
--lengths, the loop guard off), as a real document's pages differ by 100×; the tiny model would
otherwise stop every page at the same length and the slots would drain together. Inside each actor a
wrapped decode step counts, step by step, the slots that hold a page. Reported per run:

    step idle    1 - occupied slot-steps / (slots × steps): the slots each step ran empty
    time idle    1 - Σ occupied × step time / Σ slots × (the run's last decode step - the actor's
                 first): also counts an actor waiting between its batches, and one done while another
                 still works (pages handed out unevenly); not the actors' start-up
    streams      continuous batches an actor began: each ends by draining its slots

CPU only: the numbers say how the slots are fed, not how fast a GPU decodes. Needs the test extra
(transformers, to write the tiny checkpoint) and runs from the repo root.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import random
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers

from kosmos_cli.distributed.worker import Worker  # noqa: E402


class MeteredWorker(Worker):
    """A Worker whose pages have forced lengths and whose decode steps are counted (to ``stats``)."""

    def __init__(self, *args, lengths: tuple[int, int], stats: str, **options):
        super().__init__(*args, **options)
        from kosmos_cli.models import generation

        self.stats = Path(stats) / f"{os.getpid()}.json"
        self.counts = counts = dict(steps=0, occupied=0, slots=0, busy_time=0.0, first=None, last=None, pages=0,
                                    streams=0)
        advance = generation._Batch._advance

        def counted(batch) -> None:
            start = time.perf_counter()
            advance(batch)
            end = time.perf_counter()
            occupied = sum(owner is not None for owner in batch.owner)
            counts["steps"] += 1
            counts["occupied"] += occupied
            counts["slots"] += batch.slots
            counts["busy_time"] += occupied * (end - start)
            counts["first"] = start if counts["first"] is None else counts["first"]
            counts["last"] = end

        generation._Batch._advance = counted
        stream = self.engine.stream_backing_off

        def forced(jobs, **options):
            options["loop_check"] = None  # the tiny model repeats itself: the guard would cut pages short
            return stream((_forced(job, *lengths) for job in jobs), **options)

        self.engine.stream_backing_off = forced

    def run(self, refs, *args, **kwargs):
        self.counts["streams"] += 1  # continuous batches begun: each ends with its slots drained
        try:
            for record in super().run(refs, *args, **kwargs):
                self.counts["pages"] += 1
                yield record
        finally:
            self.stats.write_text(json.dumps(self.counts))


def _forced(job, lo: int, hi: int):
    """The job with its page's length: drawn from a seed of the page's pixels, so a page has the same
    length whichever actor takes it."""
    rng = random.Random(zlib.crc32(job.prepared.vision_input.numpy().tobytes()))
    n = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return dataclasses.replace(job, max_new_tokens=n, min_new_tokens=n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=96)
    parser.add_argument("--files", type=int, default=4, help="PDFs the pages are spread over")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--lengths", default="8-200", help="new tokens a page, LO-HI (log-uniform)")
    parser.add_argument("--pages-per-call", default="4,64", help="Ray batch sizes to compare (0: the default)")
    parser.add_argument("--via", choices=("cli", "dataset"), default="cli",
                        help="transcribe_on_ray (kosmos --ray: the driver lists the pages) or transcribe_dataset")
    parser.add_argument("--reference", action="store_true",
                        help="first, one Worker in this process over every page (no Ray): the idle a single "
                             "continuous batch has anyway (its end, and the time outside decode steps)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    lo, hi = (int(x) for x in args.lengths.split("-"))

    import ray

    from kosmos_cli.distributed.ray_data import transcribe_dataset, transcribe_on_ray
    from kosmos_cli.distributed.worker import EngineSpec, PageRef
    from kosmos_cli.pages import iter_pages
    from tests.helpers.kosmos2_5 import make_kosmos2_5_checkpoint
    from tests.helpers.pdfs import make_image_pdf

    work = Path(tempfile.mkdtemp(prefix="ray-slots-"))
    model = str(make_kosmos2_5_checkpoint(work / "model", tied=True, sharded=False, image_dependent=False))
    per_file = -(-args.pages // args.files)
    pdfs = [make_image_pdf(work / f"doc{k}.pdf", min(per_file, args.pages - k * per_file)) for k in range(args.files)]
    results = []
    if args.reference:
        import torch

        torch.set_num_threads(1)  # as a Ray actor with one CPU
        stats = work / "stats-reference"
        stats.mkdir()
        worker = MeteredWorker(EngineSpec(model, "cpu", "float32", False), "ocr", batch_size=args.slots,
                               max_new_tokens=hi, lengths=(lo, hi), stats=str(stats))
        refs = [(k, PageRef.of(job, 72, None)) for k, job in enumerate(iter_pages(pdfs, None, 72, None, render=False))]
        started = time.perf_counter()
        assert len(list(worker.run(refs))) == args.pages
        results.append(_summary("reference (1 worker, no Ray)", time.perf_counter() - started, stats, 1, args.slots))
        print(json.dumps(results[-1]), flush=True)
    ray.init(num_cpus=args.actors, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    for per_call in (int(x) for x in args.pages_per_call.split(",")):
        stats = work / f"stats-{per_call}"
        stats.mkdir()
        options = dict(batch_size=args.slots, max_new_tokens=hi, pages_per_call=per_call or None,
                       worker=functools.partial(MeteredWorker, lengths=(lo, hi), stats=str(stats)))
        started = time.perf_counter()
        if args.via == "cli":
            spec = EngineSpec(model, "cpu", "float32", False)
            items = iter_pages(pdfs, None, 72, None, render=False)
            done = [result for _, result in transcribe_on_ray(spec, args.actors, "ocr", items, dpi=72, **options)]
        else:
            done = transcribe_dataset(pdfs, "ocr", model=model, workers=args.actors, dpi=72, dtype="float32",
                                      compile=False, **options).take_all()
        assert len(done) == args.pages
        results.append(_summary(f"{args.via}, pages_per_call={per_call or 'default'}", time.perf_counter() - started,
                                stats, args.actors, args.slots))
        print(json.dumps(results[-1]), flush=True)
    ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), results=results), indent=2))


def _summary(run: str, wall: float, stats: Path, actors: int, slots: int) -> dict:
    counted = [json.loads(p.read_text()) for p in sorted(stats.glob("*.json"))]
    steps, occupied, available_steps = (sum(a[k] for a in counted) for k in ("steps", "occupied", "slots"))
    end, first = max(a["last"] for a in counted), min(a["first"] for a in counted)
    # An actor that never decoded was available from the run's first step.
    available = slots * (sum(end - a["first"] for a in counted) + (actors - len(counted)) * (end - first))
    return dict(run=run, wall_s=round(wall, 1), decode_span_s=round(end - first, 1),
                pages_per_actor=[a["pages"] for a in counted] + [0] * (actors - len(counted)),
                streams_per_actor=[a["streams"] for a in counted], steps=steps,
                step_idle=round(1 - occupied / available_steps, 3),
                time_idle=round(1 - sum(a["busy_time"] for a in counted) / available, 3))


if __name__ == "__main__":
    main()
