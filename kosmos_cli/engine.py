"""`load()` and `Engine`: preprocessing + model + greedy generation + decoding, for both models."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from PIL import Image

from .confidence import align
from .models import kosmos2, kosmos2_5
from .models.config import Architecture
from .jobs import Job, JobQueue, Prompts, request_for
from .models.generation import ADMIT_CHUNK, CompiledDecodeStep, DecodeSettings, LoopCheck, Request, stream
from .models.layers import MultiheadAttention, check_attention, cuda_capability, flash_available
from .models.loading import ModelLoadError, load_weights, read_json, resolve_model_dir
from .processing.images import read_image_processor_config

# Every model this package runs, by config.json's model_type.
ARCHITECTURES = {arch.name: arch for arch in (kosmos2_5.ARCHITECTURE, kosmos2.ARCHITECTURE)}


@dataclass
class Prepared:
    """One image ready for the model: the vision tower's input (CPU) and its model-space size."""

    vision_input: torch.Tensor
    model_size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.vision_input.numel() * self.vision_input.element_size()


@dataclass
class Output:
    """One image's generation: new ids, their text, why decoding stopped ("eos", "length", "loop"),
    the size (width, height) of the image as the model saw it (Kosmos-2.5 OCR boxes live there), and
    the natural log of the probability of each id, plus the EOS's when it stopped on one (the same as
    transformers' compute_transition_scores with normalize_logits=True: the softmax of the raw
    logits, before min_new_tokens' and no_repeat_ngram_size's bans)."""

    ids: list[int]
    text: str
    stop: str
    model_size: tuple[int, int]
    logprobs: list[float]

    @property
    def truncated(self) -> bool:
        return self.stop != "eos"


def pick_device(device: str | torch.device = "auto", name: str = "device") -> torch.device:
    """"auto" (the GPU where PyTorch sees one, else the CPU), "cpu", "cuda" or "cuda:N" as a torch
    device. Anything else, or a GPU this machine lacks, raises ValueError in words that call the
    choice `name` (the CLI passes "--device")."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except RuntimeError:  # torch's message lists every device type it knows, most not ours
        picked = None
    if picked is None or picked.type not in ("cpu", "cuda") or (picked.type == "cpu" and picked.index):
        raise ValueError(f"{name} must be auto, cpu, cuda or cuda:N, not {device!r}")
    if picked.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {device}: PyTorch sees no CUDA GPU (use {name} cpu)")
        count = torch.cuda.device_count()
        if picked.index is not None and picked.index >= count:
            names = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise ValueError(f"{name} {device}: PyTorch sees {count} CUDA GPU{'s' * (count != 1)} ({names})")
    return picked


def pick_devices(value: str = "auto", name: str = "device") -> list[torch.device]:
    """The devices a run uses, one worker each: "auto" (every visible GPU when PyTorch sees several,
    else the one `pick_device("auto")` picks), "all" (every visible GPU), or a comma-separated list of
    what `pick_device` accepts ("cpu,cpu" is two CPU workers; a GPU listed twice is refused).
    Raises ValueError in words that call the choice `name`."""
    value = str(value).strip()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if value == "all":
        if count == 0:
            raise ValueError(f"{name} all: PyTorch sees no CUDA GPU (use {name} cpu)")
        return [torch.device("cuda", i) for i in range(count)]
    if value == "auto":
        return [torch.device("cuda", i) for i in range(count)] if count > 1 else [pick_device("auto", name)]
    parts = [part.strip() for part in value.split(",")]
    if len(parts) > 1 and any(part in ("", "auto", "all") for part in parts):
        raise ValueError(f"{name} {value}: a list names devices (cpu, cuda, cuda:N), not {name} auto or all")
    devices = [pick_device(part, name) for part in parts]
    gpus = [torch.device("cuda", d.index or 0) for d in devices if d.type == "cuda"]
    if len(set(gpus)) < len(gpus):
        twice = next(g for g in gpus if gpus.count(g) > 1)
        raise ValueError(f"{name} {value}: {twice} is listed twice (one worker a GPU)")
    return devices


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """auto: bf16 on Ampere and newer GPUs (what the models are run in), fp16 on older ones (no bf16
    in their tensor cores, Triton or fused SDPA kernels: bf16 would run the vision encoder's attention
    through SDPA's math kernel and fail to compile), fp32 on the CPU (bf16 matmuls are slow there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if cuda_capability(device) >= (8, 0) else torch.float16
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}") from None


def read_config(model_dir: Path) -> tuple[Architecture, Any]:
    """The architecture config.json's model_type names, and the config it reads from the file."""
    data = read_json(model_dir, "config.json")
    model_type = str(data.get("model_type", "")).replace("_", "-")
    if model_type not in ARCHITECTURES:
        raise ModelLoadError(f"{Path(model_dir) / 'config.json'} has model_type {data.get('model_type')!r}; "
                             f"supported: {', '.join(ARCHITECTURES)}")
    architecture = ARCHITECTURES[model_type]
    return architecture, architecture.config.from_hf(data)


class Checkpoint:
    """A checkpoint's configuration, tokenizer and image preprocessing, without its weights: what a
    process that only lists and describes work needs (a server whose model runs in worker processes
    counts prompt tokens with it). `Engine` is a Checkpoint with its weights loaded."""

    def __init__(self, name: str, model_dir: Path):
        self.name = name
        arch, config = read_config(model_dir)
        self.architecture, self.config = arch, config
        self.image_processor = arch.image_processor(config, read_image_processor_config(model_dir))
        self.tokenizer = arch.tokenizer(model_dir)
        self.eos_ids = _eos_ids(model_dir, config.text.eos_token_id)

    @property
    def kind(self) -> str:
        """"kosmos-2.5" or "kosmos-2": the architecture's name (config.json's model_type)."""
        return self.architecture.name

    def __str__(self) -> str:
        return self.name

    def prepare(self, image: Image.Image) -> Prepared:
        """Preprocess one image on the CPU (thread-safe: run it in background threads to overlap
        with the GPU): Kosmos-2.5 patches (P, 770) or CLIP pixels (3, H, W)."""
        return Prepared(*self.image_processor(image))

    def prompt_length(self, prompt: str) -> int:
        return len(self.tokenizer.prompt(prompt, self.config.latent_query_num)[0])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def token_starts(self, ids: Sequence[int], text: str) -> list[int] | None:
        """Where each id's text starts in ``text``, `decode(ids)`; None if that cannot be told."""
        return align(self.tokenizer.pieces(list(ids)), text)


class Engine(Checkpoint):
    """A loaded model with its tokenizer and image preprocessing. Build it with `kosmos_cli.load()`.

    kind: "kosmos-2.5" (Pix2Struct patches, prompts "<ocr>" / "<md>" / chat) or "kosmos-2"
    (CLIP pixels, grounding prompts such as "<grounding> An image of")."""

    def __init__(self, name: str, model_dir: Path, device: torch.device, dtype: torch.dtype, compile: bool = False,
                 attention: str = "auto"):
        super().__init__(name, model_dir)
        self.device, self.dtype, self.attention = device, dtype, check_attention(attention)
        config = self.config
        # The decode step, compiled once per engine (see CompiledDecodeStep), or None for plain eager. A
        # compiled engine keeps its KV cache between calls: the graphs are tied to its addresses.
        head_dim = config.text.embed_dim // config.text.attention_heads
        self.compiled = CompiledDecodeStep(device, head_dim, attention) if compile else None
        self.kept_cache = None
        self.streaming = False  # one stream at a time: a compiled engine's streams share kept_cache
        with torch.device("meta"):
            model = self.architecture.module(config)
        ignore = ("text_model.lm_head.",) if config.tie_word_embeddings else ()
        load_weights(model, model_dir, self.architecture.checkpoint_names, self.architecture.checkpoint_leaf_names,
                     dtype=dtype, device=device, ignore=ignore)
        self.model = model.eval()
        flash = flash_available(device, attention)
        for module in model.modules():
            if isinstance(module, MultiheadAttention):
                module.flash = flash

    def __str__(self) -> str:
        """What runs where, for the log: model, device (GPU name and capability), dtype, decode step."""
        where = str(self.device)
        if self.device.type == "cuda":
            major, minor = cuda_capability(self.device)
            where += f" ({torch.cuda.get_device_name(self.device)}, sm_{major}{minor})"
        if self.compiled is None:
            step = "eager decode step"
        elif self.compiled.broken:
            step = "eager decode step (compiling failed)"
        else:
            step = f"compiled decode step, {'FlexAttention' if self.compiled.flex else 'SDPA'}"
        return f"{self.name} on {where} in {str(self.dtype).removeprefix('torch.')}, {step}"

    def generate(
        self,
        images: Sequence[Image.Image],
        prompts: str | Sequence[str],
        max_new_tokens: int | Sequence[int] = 1024,
        min_new_tokens: int | Sequence[int] = 0,
        no_repeat_ngram_size: int | None = None,
    ) -> list[list[int]]:
        """Greedy new token ids per image (EOS excluded). `prompts`: one task text for all images or
        one per image (e.g. "<ocr>", "<md>", "<grounding> An image of"); `max_new_tokens` and
        `min_new_tokens` (EOS forbidden before it) likewise.
        Batching does not change the result in fp32 (a row's math never reads another row); in
        bf16/fp16 on a GPU, kernels picked by batch shape may round differently and flip a near-tie.
        no_repeat_ngram_size: None = the model's default (3 for Kosmos-2, as its demo; 0 for Kosmos-2.5)."""
        outputs = self.run(images, prompts, max_new_tokens, min_new_tokens, no_repeat_ngram_size)
        return [out.ids for out in outputs]

    def run(
        self,
        images: Sequence[Image.Image],
        prompts: str | Sequence[str],
        max_new_tokens: int | Sequence[int] = 1024,
        min_new_tokens: int | Sequence[int] = 0,
        no_repeat_ngram_size: int | None = None,
        loop_check: LoopCheck | None = None,
        batch_size: int | None = None,
    ) -> list[Output]:
        """Like generate(), with decoded text, stop reasons and model-space sizes, in input order.
        `loop_check` ends rows that have fallen into a loop (see LoopCheck); `batch_size` caps the
        slots decoded together (default: as many as fit, see auto_batch_size; halved on running out
        of memory, down to one image at a time: see stream_backing_off). An image that runs out of
        memory alone raises torch.OutOfMemoryError."""
        images = list(images)
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        limits = [max_new_tokens] * len(images) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        minimums = [min_new_tokens] * len(images) if isinstance(min_new_tokens, int) else list(min_new_tokens)
        if not (len(prompts) == len(images) == len(limits) == len(minimums)):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts and {len(limits)}/{len(minimums)} token limits")
        if not images:
            return []
        jobs = [Job(i, self.prepare(im), p, n, m) for i, (im, p, n, m) in enumerate(zip(images, prompts, limits, minimums))]
        if batch_size is None:
            longest = max(prompts, key=self.prompt_length)
            # A compiled step takes at least two rows where memory allows (the second empty for one
            # image): a one-row step would be compiled apart, a second compile for this engine.
            wanted = max(len(images), 2 if self.compiled is not None else 1)
            batch_size = min(wanted, self.auto_batch_size(longest, max(limits)))
        results: dict[int, Output] = {}
        for key, out in self.stream_backing_off(jobs, slots=batch_size, no_repeat_ngram_size=no_repeat_ngram_size,
                                                loop_check=loop_check):
            if out is None:
                raise torch.OutOfMemoryError(f"out of memory on image {key} alone: lower max_new_tokens or use the CPU")
            results[key] = out
        return [results[i] for i in range(len(images))]

    def stream(
        self,
        jobs: Iterable[Job] | JobQueue,
        *,
        slots: int,
        max_prompt_tokens: int | None = None,
        max_new_tokens: int | None = None,
        no_repeat_ngram_size: int | None = None,
        loop_check: LoopCheck | None = None,
    ) -> Iterator[tuple[Any, Output]]:
        """Continuous batching: yield (job.key, Output) as pages finish, for jobs that may arrive lazily.

        ``jobs`` may be a `JobQueue` (`job_queue`): the stream then runs until the queue is closed, with
        the queue's bounds. A lazy stream must bound its prompts and budgets up front (max_prompt_tokens,
        max_new_tokens) to size the KV cache; a job beyond them raises ValueError naming its key as
        soon as it is pulled, before any work on it, and ends the stream: jobs pulled before it and
        not yet yielded are not returned (pass the bounds of every job to be safe).
        An engine runs one stream at a time (RuntimeError otherwise): run streams one after another,
        or load one engine per thread."""
        if self.streaming:
            raise RuntimeError("this engine is already running a stream; finish or close it first")
        self.streaming = True
        try:
            yield from self._stream(jobs, slots, max_prompt_tokens, max_new_tokens, no_repeat_ngram_size, loop_check)
        finally:
            self.streaming = False

    def stream_backing_off(self, jobs: Iterable[Job], *, slots: int, **options) -> Iterator[tuple[Any, Output | None]]:
        """`stream` (with `options`) that survives running out of memory: it releases the memory,
        halves the slots and queues the jobs in flight again, first and in their order (greedy
        decoding is deterministic: their results do not change). A job that runs out of memory
        alone (one slot) comes out as (job.key, None), and the next ones go on."""
        source = iter(jobs)
        waiting: deque[Job] = deque()  # the jobs in flight when memory ran out, to be admitted first
        in_flight: dict[Any, Job] = {}  # the jobs the stream has taken, in the order it took them

        def pending() -> Iterator[Job]:
            while waiting or (fresh := next(source, None)) is not None:
                job = waiting.popleft() if waiting else fresh
                in_flight[job.key] = job  # before the stream sees it: running out of memory may follow
                yield job

        while True:
            try:
                for key, out in self.stream(pending(), slots=slots, **options):
                    del in_flight[key]
                    yield key, out
                return
            except torch.OutOfMemoryError:
                pass
            # Outside the except block, so that its traceback no longer holds the failed batch's
            # tensors when the memory is released.
            self.release_memory()
            waiting.extendleft(reversed(in_flight.values()))
            in_flight.clear()
            if slots > 1:
                slots //= 2
            else:
                yield waiting.popleft().key, None

    def _stream(self, jobs, slots, max_prompt_tokens, max_new_tokens, no_repeat_ngram_size, loop_check):
        if isinstance(jobs, JobQueue):
            requests, sizes = jobs.requests, jobs.sizes
            max_prompt_tokens, max_new_tokens = jobs.max_prompt_tokens, jobs.max_new_tokens
        else:
            prompts = Prompts(self)
            if max_prompt_tokens is None or max_new_tokens is None:
                jobs = list(jobs)
                if not jobs:
                    return
                max_prompt_tokens = max(len(prompts[job.prompt].ids) for job in jobs)
                max_new_tokens = max(job.max_new_tokens for job in jobs)
            sizes: dict[Any, tuple[int, int]] = {}

            def requests() -> Iterator[Request]:
                for job in jobs:
                    request = request_for(job, prompts[job.prompt], max_prompt_tokens, max_new_tokens)
                    sizes[job.key] = job.prepared.model_size
                    yield request

            requests = requests()

        ngram = self.architecture.no_repeat_ngram_size if no_repeat_ngram_size is None else no_repeat_ngram_size
        settings = DecodeSettings(tuple(self.eos_ids), self.config.text.pad_token_id, ngram, loop_check)
        for key, generated in stream(
            self.model.encode_images, self.model.text, requests, slots=slots,
            capacity=max_prompt_tokens + max_new_tokens, settings=settings, dtype=self.dtype, device=self.device,
            decode=self.compiled, cache=self._cache if self.compiled is not None else None,
        ):
            size = sizes.pop(key, None)
            if size is None:  # cancelled while it finished
                continue
            yield key, Output(generated.ids, self.decode(generated.ids), generated.stop, size, generated.logprobs)

    def job_queue(self, max_prompt_tokens: int, max_new_tokens: int) -> JobQueue:
        """An open-ended source of jobs for `stream` (a server's): see `JobQueue`."""
        return JobQueue(self, max_prompt_tokens, max_new_tokens)

    def auto_batch_size(self, prompt: str, max_new_tokens: int, limit: int = 64) -> int:
        """The most slots that fit: on CUDA, free memory (after the weights), less the activations of
        one admission (`admission_bytes`), over one slot's KV cache (prompt + budget) plus its logits;
        4 on the CPU, where larger batches stop paying off. Out-of-memory still halves it."""
        if self.device.type != "cuda":
            return 4
        free, _ = torch.cuda.mem_get_info(self.device)
        text = self.config.text
        kv_per_token = text.layers * 2 * text.embed_dim * torch.finfo(self.dtype).bits // 8
        prompt_tokens = self.prompt_length(prompt)
        per_slot = kv_per_token * (prompt_tokens + max_new_tokens) + text.vocab_size * 8
        reserve = self.admission_bytes(prompt_tokens)
        return max(1, min(limit, int((free - reserve) * 0.9) // per_slot))

    def admission_bytes(self, prompt_tokens: int) -> int:
        """Memory for admitting ADMIT_CHUNK newcomers at once: the vision encoder's activations per
        image (tokens x (4 x width + 3 x MLP width): residual, norm, q/k/v/out and the MLP's
        intermediates; attention itself is fused) plus the prompt's prefill (tokens x (4 x dim + 2 x
        FFN)), with half again for the allocator's fragmentation and 512 MiB for kernels' workspace.
        Kosmos-2.5 in bf16: ~150 MB per image, ~75 MB per prompt, 3.0 GiB in all."""
        vision, text = self.config.vision, self.config.text
        per_image = self.image_processor.tokens * (4 * vision.hidden_size + 3 * vision.intermediate_size)
        per_prompt = prompt_tokens * (4 * text.embed_dim + 2 * text.ffn_dim)
        element = torch.finfo(self.dtype).bits // 8
        return int(ADMIT_CHUNK * (per_image + per_prompt) * element * 1.5) + 512 * 2**20

    def release_memory(self) -> None:
        """Drop the kept KV cache and hand cached GPU blocks back (after running out of memory), so
        that a retry with fewer slots allocates a smaller cache instead of reusing the large one."""
        self.kept_cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _cache(self, slots: int, capacity: int):
        """The kept KV cache when it is large enough, else a new one (kept from then on)."""
        if self.kept_cache is None or not self.kept_cache.fits(slots, capacity):
            self.kept_cache = None  # free the old one first
            self.kept_cache = self.model.text.new_cache(slots, capacity, dtype=self.dtype, device=self.device, static=True)
        return self.kept_cache


def _eos_ids(model_dir: Path, configured: int | list[int]) -> list[int]:
    """EOS ids from generation_config.json when present, else from config.json."""
    settings = read_json(model_dir, "generation_config.json", required=False) or {}
    source = "generation_config.json" if "eos_token_id" in settings else "config.json"
    configured = settings.get("eos_token_id", configured)
    ids = [configured] if isinstance(configured, int) else configured
    if not (isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
        raise ModelLoadError(f"{Path(model_dir) / source}: eos_token_id must be a token id or a list of them, "
                             f"not {configured!r}")
    return ids


def compiles_by_default(device: torch.device) -> bool:
    """On CUDA GPUs that Triton supports (Volta and newer); not on the CPU (see `load`)."""
    return device.type == "cuda" and cuda_capability(device) >= (7, 0)


def describe(model: str = "microsoft/kosmos-2.5") -> Checkpoint:
    """A checkpoint's configuration, tokenizer and preprocessing (`Checkpoint`), its weights left on disk."""
    return Checkpoint(str(model), resolve_model_dir(model))


def load(
    model: str = "microsoft/kosmos-2.5",
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    compile: bool | str = "auto",
    attention: str = "auto",
) -> Engine:
    """Load a Kosmos-2.5 or Kosmos-2 checkpoint from a local directory or a Hugging Face repo id.

    compile: run the decode step through torch.compile (CUDA graphs on a GPU). "auto" compiles on
    CUDA GPUs that Triton supports, where it removes per-token launch overhead, and not on the CPU,
    where compiling takes about a minute before it pays off.
    attention: the attention kernels, "auto", "sdpa" or "flex" (see models/layers.py)."""
    check_attention(attention)  # a bad choice fails here, before any work
    device = pick_device(device)
    if compile == "auto":
        compile = compiles_by_default(device)
    return Engine(str(model), resolve_model_dir(model), device, pick_dtype(dtype, device), bool(compile), attention)
