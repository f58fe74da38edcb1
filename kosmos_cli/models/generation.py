"""Greedy generation with continuous batching over a preallocated KV cache.

Each sequence owns a cache slot (one row of the cache) with its own length. The decoder runs one
fixed-shape step over all slots at a time; when a sequence finishes, its slot is handed to the next
waiting sequence (vision encoder + prefill for the newcomer) while the other slots keep decoding.
Nothing a slot computes depends on the other slots, so results equal decoding each sequence alone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.fx.experimental import _config as fx_config

from .admission import RequestQueue, IterableRequests
from .cache import KVCache, StepPlan
from .decoder import TextDecoder
from .layers import flex_decoding

# The loop guard copies the generated tokens to the host and scans them in Python, so it runs less often.
LOOP_CHECK_EVERY = 32
ADMIT_CHUNK = 8  # newcomers encoded and prefilled together (bounds their activation memory)


@dataclass(frozen=True)
class Schedule:
    """How the decode loop trades wasted work for fewer host syncs and fewer distinct step shapes.

    sync_every: decode steps between host checks for finished sequences. On CUDA each check is a
    host-device sync, which would otherwise stall the GPU queue once per token; a finished slot
    idles (stepping on pad tokens) at most this many steps before it is refilled.
    span_bucket: decode attention reads the cache prefix [0, span) rounded up to this; masked keys
    weigh exactly 0, so the bucket changes no result, and the step keeps one shape for many steps.
    pow2_rows: the step covers the occupied slots rounded up to a power of two, not their exact
    count. Coarse buckets and power-of-two rows keep the number of recorded CUDA graphs small.
    loop_prefilter: the loop check first screens every row on the device, so that only rows that
    may loop are copied to the host and scanned there (the GPU waits for that scan)."""

    sync_every: int
    span_bucket: int
    pow2_rows: bool
    loop_prefilter: bool  # screen rows for loops on the device (LoopCheck.may_loop) before the host check


# A CPU check costs nothing; screening rows for loops costs the CPU more than the host check saves.
CPU_SCHEDULE = Schedule(sync_every=1, span_bucket=64, pow2_rows=False, loop_prefilter=False)
CUDA_SCHEDULE = Schedule(sync_every=8, span_bucket=256, pow2_rows=True, loop_prefilter=True)


def schedule_for(device: torch.device) -> Schedule:
    return CUDA_SCHEDULE if device.type == "cuda" else CPU_SCHEDULE


@dataclass
class Prompt:
    """One sequence's prompt: token ids and the image mask (1 where an image embedding goes)."""

    ids: list[int]
    image_mask: list[int]


@dataclass
class Request:
    """A sequence to generate: its prompt, token budget, the vision tower's input for its image
    (one row, e.g. patches (P, 770)) and a key the caller uses to match results."""

    prompt: Prompt
    max_new_tokens: int
    vision_input: torch.Tensor
    key: Any = None
    min_new_tokens: int = 0  # EOS is forbidden before this many new tokens


@dataclass
class Generated:
    """One sequence's new ids (EOS excluded), why it stopped ("eos", "length" or "loop"), and the
    natural log of the probability of each id kept, plus the EOS's when it stopped on one (under the
    softmax of the model's raw logits: before the EOS ban of min_new_tokens and the n-gram ban)."""

    ids: list[int]
    stop: str
    logprobs: list[float]


@dataclass(frozen=True)
class LoopCheck:
    """Ends rows that have fallen into a loop, every LOOP_CHECK_EVERY steps.

    keep(new ids) -> how many of them to keep, or None (no loop). window: how many trailing ids keep
    needs to see a loop (None: all); it gets the whole row once it finds one, to say where the loop
    starts. may_loop(tails (A, window) on the device) -> (A,) bool: a cheap necessary condition, so
    that keep runs on the host only for rows that may loop (see Schedule.loop_prefilter)."""

    keep: Callable[[list[int]], int | None]
    window: int | None = None
    may_loop: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class DecodeSettings:
    eos_ids: tuple[int, ...] = (2,)
    pad_id: int = 1
    no_repeat_ngram_size: int = 0
    loop_check: LoopCheck | None = None


def stream(
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    decoder: TextDecoder,
    requests: Iterable[Request] | RequestQueue,
    *,
    slots: int,
    capacity: int,
    settings: DecodeSettings,
    dtype: torch.dtype,
    device: torch.device,
    decode: Callable | None = None,
    cache: Callable[[int, int], KVCache] | None = None,
) -> Iterator[tuple[Any, Generated]]:
    """Yield (request.key, Generated) as sequences finish (not in request order). ``requests``: an
    iterable (the stream ends when it does), or a `RequestQueue` (it ends when the queue is closed).

    slots: sequences decoded together; capacity: the longest prompt + max_new_tokens any request
    may need (the caller checks every request against it, as Engine.stream does).
    encode_images(stacked vision inputs) -> image embeddings (n, Q, D). decode: the decode step
    function (decode_step, or a compiled version of it). cache(slots, capacity): the KV cache to
    use (default: a new one)."""
    cache = cache or (lambda n, c: decoder.new_cache(n, c, dtype=dtype, device=device))
    batch = _Batch(encode_images, decoder, slots, capacity, settings, dtype, device, decode or decode_step, cache)
    yield from batch.drain(requests if isinstance(requests, RequestQueue) else IterableRequests(requests))


class _Batch:
    """The state of a continuous batch (its tensors are inference tensors: each method that touches
    them runs in inference mode, none across a yield to the caller). Device tensors: tokens (S, C) every slot's sequence,
    lengths (S,), limits and minimums (S,) as lengths, done (S,), hidden (S, D) the last hidden state.
    The host mirrors lengths exactly (every assigned slot advances by one per step) so that it
    never has to read them back. logprobs (S, C) float32: the log-probability of each token at its
    position in tokens (prompt positions unused), read back with the tokens when a row finishes."""

    @torch.inference_mode()
    def __init__(self, encode_images, decoder, slots, capacity, settings, dtype, device, decode, cache):
        self.encode_images, self.decoder, self.settings, self.decode_step = encode_images, decoder, settings, decode
        self.slots, self.device = slots, device
        self.schedule = schedule_for(device)
        # Slack: a finished slot keeps stepping (on pad tokens) until the next sync frees it.
        self.capacity = capacity + self.schedule.sync_every + 1
        # The cache holds one more position than the last span bucket, so that every span is
        # shorter than it: a span equal to the cache's length takes another path through the
        # compiled step (a recompile mid-run).
        self.cache = cache(slots, _round_up(self.capacity, self.schedule.span_bucket) + 1)
        self.tokens = torch.full((slots, self.capacity), settings.pad_id, dtype=torch.long, device=device)
        self.logprobs = torch.zeros((slots, self.capacity), dtype=torch.float32, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.limits = torch.zeros(slots, dtype=torch.long, device=device)
        self.minimums = torch.zeros(slots, dtype=torch.long, device=device)  # prompt length + min_new_tokens
        self.done = torch.ones(slots, dtype=torch.bool, device=device)
        self.advance = torch.zeros(slots, dtype=torch.long, device=device)  # 1 for assigned slots
        self.hidden = torch.zeros(slots, decoder.dim, dtype=dtype, device=device)
        self.eos = torch.tensor(settings.eos_ids, device=device)
        self.owner: list[Request | None] = [None] * slots
        self.lengths_host = [0] * slots
        self.looped: dict[int, int] = {}
        self.cancelled: set[int] = set()  # rows whose request was cancelled: freed without a result

    def drain(self, requests: RequestQueue | IterableRequests) -> Iterator[tuple[Any, Generated]]:
        """Decode until every request is done, admitting new ones as slots free up."""
        exhausted = False
        step = 0
        while True:
            if not exhausted:
                exhausted = self._admit(requests)
            self._cancel(requests.cancelled())
            if all(owner is None for owner in self.owner):
                if exhausted:
                    return
                continue  # a queue with nothing yet: the next admission waits for a request
            for _ in range(self.schedule.sync_every):
                self._advance()
                step += 1
                if self.settings.loop_check is not None and step % LOOP_CHECK_EVERY == 0:
                    self._check_loops()
            yield from self._collect()

    @torch.inference_mode()
    def _admit(self, requests: RequestQueue | IterableRequests) -> bool:
        """Fill free slots with waiting requests (encode + prefill). Returns True when none are left.
        Waits for a request only when no row is running."""
        free = [s for s, owner in enumerate(self.owner) if owner is None]
        idle = len(free) == self.slots
        newcomers: list[Request] = []
        exhausted = False
        while len(newcomers) < len(free):
            try:
                request = requests.take(wait=idle and not newcomers)
            except StopIteration:
                exhausted = True
                break
            if request is None:
                break
            newcomers.append(request)
        if not newcomers:
            return exhausted
        # A few newcomers at a time: the vision encoder's and the prefill's activations grow with
        # their number, and the first admission fills every slot.
        for first in range(0, len(newcomers), ADMIT_CHUNK):
            chunk = newcomers[first : first + ADMIT_CHUNK]
            self._prefill(free[first : first + len(chunk)], chunk)
        return exhausted

    def _prefill(self, rows: list[int], newcomers: list[Request]) -> None:
        """Encode the newcomers' images and prefill their prompts into the given free slots."""
        lens = [len(r.prompt.ids) for r in newcomers]
        width = max(lens)
        ids = torch.full((len(rows), width), self.settings.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(newcomers):
            ids[i, : lens[i]] = torch.tensor(r.prompt.ids)
            mask[i, : lens[i]] = torch.tensor(r.prompt.image_mask)
        ids, mask = ids.to(self.device), mask.to(self.device)
        rows_t = torch.tensor(rows, device=self.device)
        lens_t = torch.tensor(lens, device=self.device)
        embeds = self.encode_images(torch.stack([r.vision_input for r in newcomers]).to(self.device))
        x = self.decoder.embed(ids, torch.zeros_like(rows_t), embeds, mask)
        h = self.decoder(x, self.cache, StepPlan.prefill_rows(rows_t))
        self.hidden[rows_t] = h[torch.arange(len(rows), device=self.device), lens_t - 1]
        self.tokens[rows_t] = self.settings.pad_id
        self.tokens[rows_t, :width] = ids
        self.lengths[rows_t] = lens_t
        limits = torch.tensor([r.max_new_tokens for r in newcomers], device=self.device)
        self.limits[rows_t] = lens_t + limits
        self.minimums[rows_t] = lens_t + torch.tensor([r.min_new_tokens for r in newcomers], device=self.device)
        self.done[rows_t] = limits <= 0
        self.advance[rows_t] = 1
        for row, r, n in zip(rows, newcomers, lens):
            self.owner[row] = r
            self.lengths_host[row] = n

    @torch.inference_mode()
    def _advance(self) -> None:
        """One decode step for the first k slots (all occupied ones): newcomers take the lowest
        free slots, so k shrinks as the last pages drain (see Schedule.pow2_rows). The math runs in
        `decode_step` (compiled when asked)."""
        k = self._rows_in_use()
        lengths = self.lengths[:k]
        span = _round_up(max(self.lengths_host[:k]) + 1, self.schedule.span_bucket)
        next_ids, logprobs, done, hidden = self.decode_step(
            self.decoder, self.cache, self.hidden[:k], self.tokens[:k], lengths, self.minimums[:k],
            self.limits[:k], self.done[:k], self.eos, self.settings.pad_id, self.settings.no_repeat_ngram_size, span,
        )
        # Finished slots write pad past their end; free slots (advance 0) rewrite index 0 harmlessly.
        rows = torch.arange(k, device=self.device)
        self.tokens[rows, lengths] = next_ids
        self.logprobs[rows, lengths] = logprobs
        self.done[:k] = done
        self.hidden[:k] = hidden
        lengths += self.advance[:k]
        self.lengths_host = [n + (o is not None) for n, o in zip(self.lengths_host, self.owner)]

    def _rows_in_use(self) -> int:
        """The occupied slots, at least 2 where there are: torch compiles a one-row step apart."""
        k = max(1 + max(s for s, owner in enumerate(self.owner) if owner is not None), 2)
        if self.schedule.pow2_rows:
            k = 1 << (k - 1).bit_length()
        return min(self.slots, k)

    @torch.inference_mode()
    def _check_loops(self) -> None:
        """Run the loop check on every unfinished slot; stop looping ones. One device-to-host copy
        of the last `window` new ids of each such slot (or only of those that may loop, when the
        schedule screens them on the device first), and of the whole row of a slot that loops."""
        check = self.settings.loop_check
        active = [s for s, done in enumerate(self.done.tolist()) if not done and self.owner[s] is not None]
        if not active:
            return
        starts = [len(self.owner[s].prompt.ids) for s in active]
        ends = [self.lengths_host[s] for s in active]
        width = check.window or max(end - start for start, end in zip(starts, ends))
        if width <= 0:
            return
        # (active, width) ids ending at each slot's length; those of its prompt are cut off below.
        ends_t = torch.tensor(ends, device=self.device)
        columns = (ends_t[:, None] - width + torch.arange(width, device=self.device)).clamp_min(0)
        tails = self.tokens[torch.tensor(active, device=self.device)[:, None], columns]
        if self.schedule.loop_prefilter and check.may_loop is not None:
            screened = check.may_loop(tails).nonzero().flatten().tolist()
            active, starts, ends = ([values[i] for i in screened] for values in (active, starts, ends))
            tails = tails[screened]
        for s, start, end, tail in zip(active, starts, ends, tails.tolist()):
            new = tail[width - min(width, end - start):]
            keep = check.keep(new)
            if keep is not None and len(new) < end - start:  # the loop may begin before the tail
                keep = check.keep(self.tokens[s, start:end].tolist())
            if keep is not None:
                self.looped[s] = keep
                self.done[s] = True

    @torch.inference_mode()
    def _cancel(self, keys: set) -> None:
        """Stop the rows of cancelled requests; the next collect frees them without a result."""
        for s, owner in enumerate(self.owner):
            if owner is not None and owner.key in keys:
                self.cancelled.add(s)
                self.done[s] = True

    @torch.inference_mode()
    def _collect(self) -> list[tuple[Any, Generated]]:
        """Hand finished sequences back and free their slots."""
        finished = [s for s, done in enumerate(self.done.tolist()) if done and self.owner[s] is not None]
        if not finished:
            return []
        collected = []
        host, host_logprobs = self.tokens[finished].tolist(), self.logprobs[finished].tolist()
        for s, row, row_logprobs in zip(finished, host, host_logprobs):
            request = self.owner[s]
            self.owner[s] = None
            self.lengths_host[s] = 0
            if s in self.cancelled:
                self.cancelled.discard(s)
                self.looped.pop(s, None)
                continue
            start = len(request.prompt.ids)
            new = row[start : start + request.max_new_tokens]
            logprobs = row_logprobs[start : start + request.max_new_tokens]
            # Only what the output keeps counts: a row steps on (pads, or tokens past a loop) until the
            # next host check, and when that comes depends on the batch and the device.
            if s in self.looped:
                keep = self.looped.pop(s)
                result = Generated(new[:keep], "loop", logprobs[:keep])
            else:
                stop = next((i for i, t in enumerate(new) if t in self.settings.eos_ids), None)
                if stop is not None:
                    result = Generated(new[:stop], "eos", logprobs[: stop + 1])
                else:
                    result = Generated(new, "length", logprobs[: len(new)])
            collected.append((request.key, result))
        free = torch.tensor(finished, device=self.device)
        self.advance[free] = 0
        self.lengths[free] = 0
        return collected


# The log-probability of each token picked costs one logsumexp over the logits. False (the raw logit
# instead) only for benchmarks/throughput.py's kosmos-unscored, which measures that cost.
SCORE_TOKENS = True


def decode_step(decoder, cache, hidden, tokens, lengths, minimums, limits, done, eos, pad_id: int, ngram: int, span: int,
                flex: bool = False):
    """Pick each row's next token from its last hidden state and run the decoder one step on it.

    hidden (k, D), tokens (k, C), lengths/minimums/limits (k,), done (k,) -> (next ids (k,), their
    log-probabilities (k,), done (k,), new hidden (k, D)). Writes only the KV cache: a pure tensor
    function, so it can be compiled (and on CUDA captured as a graph) once per (k, span) shape.
    flex: FlexAttention (see StepPlan)."""
    logits = decoder.logits(hidden).float()  # (k, V)
    # Normalised over the raw logits: the bans below only set -inf, never on the token picked, so
    # its masked logit is its raw one.
    normaliser = torch.logsumexp(logits, dim=-1) if SCORE_TOKENS else 0.0  # (k,)
    early = (lengths < minimums).unsqueeze(1)
    logits[:, eos] = logits[:, eos].masked_fill(early, float("-inf"))
    if ngram > 0:
        ban_repeated_ngrams(logits, tokens, lengths, ngram)
    picked = logits.argmax(-1)
    logprobs = logits.gather(1, picked[:, None])[:, 0] - normaliser
    next_ids = torch.where(done, pad_id, picked)
    # Not torch.isin: torch 2.4 guards its decomposition with an expression it cannot evaluate,
    # and recompiles the step on every call.
    done = done | (next_ids[:, None] == eos).any(-1) | (lengths + 1 >= limits)
    x = decoder.embed(next_ids[:, None], lengths)
    return next_ids, logprobs, done, decoder(x, cache, StepPlan.decode_all(lengths, span, flex))[:, 0]


class CompiledDecodeStep:
    """decode_step through torch.compile (on CUDA with mode="reduce-overhead": CUDA graphs, one per
    (rows, span bucket) shape), attending with FlexAttention where `flex_decoding` says so. Where
    torch cannot compile (no compiler, an unsupported Python or GPU), it warns once and runs the
    plain function (SDPA) from then on."""

    def __init__(self, device: torch.device, head_dim: int, attention: str = "auto"):
        self.flex = flex_decoding(device, head_dim, attention)
        self.broken = False
        # Every call compiles, if it must, without duck sizing: sizes that happen to be equal at the
        # first call (rows and slots, a span and a model width) would be compiled as equal, and
        # recompiled later. One patch object for all calls: building one costs ~4x entering it.
        self.without_duck_sizing = fx_config.patch(use_duck_shape=False)
        mode = "reduce-overhead" if device.type == "cuda" else None
        try:
            if mode is not None:
                # One graph per (rows, span bucket) is the plan (CUDA_SCHEDULE): for Kosmos-2.5 OCR, 13
                # spans of 256 from the 2,052-token prompt to its 3,072-token budget, times 6 power-of-two
                # row counts from 2 to 64, at most 78. torch warns past 8 graphs, advising what the
                # schedule already does; every user would see it.
                triton = torch._inductor.config.triton
                if hasattr(triton, "cudagraph_dynamic_shape_warn_limit"):
                    triton.cudagraph_dynamic_shape_warn_limit = None
            self.compiler_errors = _compiler_errors()
            self.compiled = torch.compile(decode_step, dynamic=True, mode=mode)
        except Exception as err:  # e.g. "Dynamo is not supported on Python 3.13+" (torch <= 2.5)
            warnings.warn(f"torch.compile is not available here, decoding without it: {err}")
            self.broken = True

    def __call__(self, *args):
        if not self.broken:
            try:
                with self.without_duck_sizing:
                    return self.compiled(*args, flex=self.flex)
            except self.compiler_errors as err:  # compiling happens before the step writes anything
                if (oom := _out_of_memory_inside(err)) is not None:
                    raise oom from None  # memory, not the compiler: the caller backs off and retries
                warnings.warn(f"torch.compile of the decode step failed, decoding without it: {err}")
                self.broken = True
        return decode_step(*args)


def _compiler_errors() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when it cannot compile (dynamo wraps most of the backends' errors;
    inductor's own are listed where this torch has them). A runtime error of the compiled code, such
    as out-of-memory or a CUDA fault, is none of these and reaches the caller."""
    import torch._dynamo.exc
    import torch._inductor.exc

    names = ("OperatorIssue", "InvalidCxxCompiler", "CppCompileError", "SubgraphLoweringException")
    inductor = tuple(getattr(torch._inductor.exc, name) for name in names if hasattr(torch._inductor.exc, name))
    return (torch._dynamo.exc.TorchDynamoException, *inductor)


def _out_of_memory_inside(err: BaseException) -> torch.OutOfMemoryError | None:
    """The out-of-memory error a compiler error wraps (e.g. raised while autotuning), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, torch.OutOfMemoryError):
            return err
        seen.add(id(err))
        err = getattr(err, "inner_exception", None) or err.__cause__ or err.__context__
    return None


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def ban_repeated_ngrams(logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, n: int) -> None:
    """Forbid, in place, any token that would repeat an n-gram already in the row's sequence.

    logits (B, V); tokens (B, C) with row b valid on [0, lengths[b]). Runs on the device, no sync."""
    batch, cap = tokens.shape
    if cap < n:
        return
    windows = tokens.unfold(1, n, 1)  # (B, C-n+1, n)
    start = torch.arange(windows.shape[1], device=tokens.device)
    prefix_index = (lengths.unsqueeze(1) - (n - 1) + torch.arange(n - 1, device=tokens.device)).clamp_min(0)
    prefix = tokens.gather(1, prefix_index)  # (B, n-1): the row's last n-1 tokens
    match = (windows[:, :, : n - 1] == prefix.unsqueeze(1)).all(-1)
    match &= (start.unsqueeze(0) + n <= lengths.unsqueeze(1)) & (lengths.unsqueeze(1) >= n - 1)
    vocab = logits.shape[1]
    banned = torch.where(match, windows[:, :, -1], vocab)  # vocab = a dummy column
    padded = torch.cat([logits, logits.new_zeros(batch, 1)], dim=1)
    padded.scatter_(1, banned, float("-inf"))
    logits.copy_(padded[:, :vocab])
