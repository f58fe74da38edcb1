"""What an engine's stream decodes: `Job`s (a prepared image, its prompt and budget), turned into the
batch's requests against the stream's bounds, and `JobQueue`, the open-ended source a server feeds."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .models.admission import RequestQueue
from .models.generation import Prompt, Request

if TYPE_CHECKING:
    from .engine import Engine, Prepared

__all__ = ["Job", "JobQueue", "Prompts", "request_for"]


@dataclass(frozen=True)
class Job:
    """One image for `Engine.stream`: a key to match its output, the prepared image, the prompt text
    and the token budget (EOS is forbidden before min_new_tokens)."""

    key: Any
    prepared: Prepared
    prompt: str
    max_new_tokens: int
    min_new_tokens: int = 0



class Prompts:
    """Prompt texts tokenized for one engine, the most recent KEPT of them kept (every page of
    a run usually shares one prompt; a server's chat questions are many)."""

    KEPT = 256

    def __init__(self, engine: Engine):
        self.engine = engine
        self._encoded: OrderedDict[str, Prompt] = OrderedDict()
        self._lock = threading.Lock()

    def __getitem__(self, text: str) -> Prompt:
        with self._lock:
            if text in self._encoded:
                self._encoded.move_to_end(text)
                return self._encoded[text]
        prompt = Prompt(*self.engine.tokenizer.prompt(text, self.engine.config.latent_query_num))
        with self._lock:
            self._encoded[text] = prompt
            while len(self._encoded) > self.KEPT:
                self._encoded.popitem(last=False)
        return prompt


def request_for(job: Job, prompt: Prompt, max_prompt_tokens: int, max_new_tokens: int) -> Request:
    """The batch's request for a job; ValueError if it exceeds the stream's bounds."""
    if len(prompt.ids) > max_prompt_tokens or job.max_new_tokens > max_new_tokens:
        raise ValueError(f"job {job.key!r}: a prompt of {len(prompt.ids)} tokens and {job.max_new_tokens} new "
                         f"tokens exceed the stream's bounds ({max_prompt_tokens} and {max_new_tokens})")
    return Request(prompt, job.max_new_tokens, job.prepared.vision_input, job.key, job.min_new_tokens)


class JobQueue:
    """Jobs for an engine's stream that outlives them (a server): `engine.stream(queue, slots=...)`
    runs until `close`, taking jobs as slots free up without holding back the rows running.

    `put` (any thread) checks a job against the queue's bounds first: one beyond them raises
    ValueError to its caller and the stream goes on. `cancel(key)` drops a queued job, or frees a
    running one's slot at the next host sync; a cancelled job gives no output."""

    def __init__(self, engine: Engine, max_prompt_tokens: int, max_new_tokens: int):
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        self.requests = RequestQueue()
        self.sizes: dict[Any, tuple[int, int]] = {}  # model-space size of each job put and not yet done
        self._prompts = Prompts(engine)

    def put(self, job: Job) -> None:
        request = request_for(job, self._prompts[job.prompt], self.max_prompt_tokens, self.max_new_tokens)
        self.sizes[job.key] = job.prepared.model_size
        self.requests.put(request)

    def put_again(self, jobs: list[Job]) -> None:
        """Jobs a stream took and did not finish (it ran out of memory), first in line for the next one."""
        self.requests.put_first([request_for(job, self._prompts[job.prompt], self.max_prompt_tokens, self.max_new_tokens)
                                 for job in jobs])

    def cancel(self, key: Any) -> None:
        self.requests.cancel(key)
        self.sizes.pop(key, None)

    def is_waiting(self, key: Any) -> bool:
        """Whether the job is still waiting for a slot (put, not yet taken by the stream)."""
        return self.requests.is_waiting(key)

    def close(self) -> None:
        """No more jobs: the stream ends once those put are done."""
        self.requests.close()

    def __len__(self) -> int:
        """Jobs waiting for a slot."""
        return len(self.requests)
