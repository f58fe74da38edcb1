"""An engine's stream fed by a JobQueue, as a server runs it: jobs put from another thread while rows
run, the stream waiting when idle instead of ending, per-job bounds checked at `put`, and `cancel`
for a queued job and for a running one. Outputs equal those of `Engine.run`."""

import queue
import threading
import time

import pytest

from kosmos_cli.engine import Job
from tests.helpers.images import noise_image

IMAGES = [noise_image(40 + 20 * i, 30 + 10 * i, seed=i) for i in range(4)]
WAIT = 120  # seconds: a bound on a tiny model's page, never reached when things work


class Running:
    """`engine.stream(job_queue)` in a thread; its outputs come out of `next()` (None at its end)."""

    def __init__(self, engine, job_queue, slots: int):
        self.outputs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, args=(engine, job_queue, slots), daemon=True)
        self.thread.start()

    def _run(self, engine, job_queue, slots):
        try:
            for key, output in engine.stream(job_queue, slots=slots):
                self.outputs.put((key, output))
        finally:
            self.outputs.put(None)

    def next(self):
        return self.outputs.get(timeout=WAIT)

    def rest(self) -> list:
        """Every output up to the end of the stream."""
        got = []
        while (item := self.next()) is not None:
            got.append(item)
        self.thread.join(WAIT)
        return got


def job(engine, key, image, limit, minimum=0, prompt="<ocr>"):
    return Job(key, engine.prepare(image), prompt, limit, minimum)


def test_jobs_put_while_rows_run_give_what_run_gives(engine):
    """The queue stays open and empty while a row runs: the row is not held back (its output comes
    before anything else is put), and the stream ends only when the queue is closed."""
    limits, prompts = [30, 5, 12, 20], ["<ocr>", "<md>", "<ocr>", "<md>"]
    expected = engine.run(IMAGES, prompts, limits, batch_size=1)
    jobs = engine.job_queue(engine.prompt_length("<ocr>"), 30)
    running = Running(engine, jobs, slots=2)
    jobs.put(job(engine, 0, IMAGES[0], limits[0], prompt=prompts[0]))
    first = running.next()  # nothing else was put: a blocking admission would wait here forever
    for i in (1, 2, 3):
        jobs.put(job(engine, i, IMAGES[i], limits[i], prompt=prompts[i]))
    jobs.close()
    got = dict([first, *running.rest()])
    assert sorted(got) == [0, 1, 2, 3]
    for i, out in got.items():
        assert out.ids == expected[i].ids and out.stop == expected[i].stop
        assert max(abs(a - b) for a, b in zip(out.logprobs, expected[i].logprobs)) <= 1e-5


def test_a_job_beyond_the_bounds_is_refused_and_the_stream_goes_on(engine):
    from kosmos_cli.processing.kosmos2_5 import chat_prompt

    jobs = engine.job_queue(engine.prompt_length("<ocr>"), 8)
    running = Running(engine, jobs, slots=2)
    with pytest.raises(ValueError, match="exceed the stream's bounds"):
        jobs.put(job(engine, "long", IMAGES[0], 9))
    with pytest.raises(ValueError, match="exceed the stream's bounds"):
        jobs.put(job(engine, "question", IMAGES[0], 4, prompt=chat_prompt("What is the total of this invoice?")))
    jobs.put(job(engine, "fits", IMAGES[1], 8))
    jobs.close()
    assert [key for key, _ in running.rest()] == ["fits"]
    assert jobs.sizes == {}


def test_a_cancelled_job_gives_nothing_and_frees_its_slot(engine):
    """One slot: a queued job cancelled never runs; a running one cancelled gives no output, and the
    job put after it gets the slot (without the cancel it would come out after 120 forced tokens)."""
    jobs = engine.job_queue(engine.prompt_length("<ocr>"), 120)
    running = Running(engine, jobs, slots=1)
    jobs.put(job(engine, "first", IMAGES[0], 6))
    jobs.put(job(engine, "queued", IMAGES[1], 6))
    jobs.cancel("queued")
    assert running.next()[0] == "first"
    jobs.put(job(engine, "running", IMAGES[2], 120, minimum=120))
    while len(jobs):  # until the batch has taken it: then it runs, 120 tokens if nothing stops it
        time.sleep(0.001)
    jobs.cancel("running")
    jobs.put(job(engine, "after", IMAGES[3], 6))
    jobs.close()
    rest = running.rest()
    assert [key for key, _ in rest] == ["after"]
    assert rest[0][1].ids == engine.run(IMAGES[3:], "<ocr>", 6)[0].ids
    assert jobs.sizes == {}
