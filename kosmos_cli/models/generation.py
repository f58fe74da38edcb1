"""Greedy generation over a preallocated KV cache: one batched prefill, then one-token decode steps.

Every sequence owns one cache slot and its own length, so a batch may mix prompts of different
lengths (right-padded at prefill) and still give exactly what each sequence gives alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .layers import DecodeStep, TextDecoder

# How many decode steps run between checks that every sequence has finished: each check is a
# host-device sync, which would otherwise stall the GPU queue once per token.
DONE_CHECK_EVERY = 8
# The loop guard copies the generated tokens to the host and scans them in Python, so it runs less often.
LOOP_CHECK_EVERY = 32


@dataclass
class Prompt:
    """One sequence's prompt: token ids and the image mask (1 where an image embedding goes)."""

    ids: list[int]
    image_mask: list[int]


@dataclass
class Generated:
    """One sequence's new ids (EOS excluded) and why it stopped: "eos", "length" or "loop"."""

    ids: list[int]
    stop: str


@torch.inference_mode()
def greedy_generate(
    decoder: TextDecoder,
    prompts: list[Prompt],
    image_embeds: torch.Tensor,
    *,
    max_new_tokens: list[int],
    min_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    no_repeat_ngram_size: int = 0,
    loop_check: Callable[[list[int]], int | None] | None = None,
) -> list[Generated]:
    """image_embeds (B, Q, D), one row per prompt. Returns the new ids per prompt, EOS excluded.

    loop_check(new ids) -> None, or how many of them to keep when the row has fallen into a loop;
    such a row stops there with stop="loop"."""
    device = image_embeds.device
    batch = len(prompts)
    lengths_host = [len(p.ids) for p in prompts]
    width = max(lengths_host)
    # Finished rows keep stepping until the longest limit is reached, so size for that.
    capacity = width + max(max_new_tokens)
    # tokens holds every sequence (prompt, then generated ids) for the n-gram ban and the result.
    tokens = torch.full((batch, capacity + 1), pad_id, dtype=torch.long, device=device)
    image_mask = torch.zeros((batch, width), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, : len(p.ids)] = torch.tensor(p.ids, device=device)
        image_mask[b, : len(p.ids)] = torch.tensor(p.image_mask, device=device)
    lengths = torch.tensor(lengths_host, device=device)
    limits = lengths + torch.tensor(max_new_tokens, device=device)
    eos = torch.tensor(eos_ids, device=device)

    cache = decoder.new_cache(batch, capacity, dtype=image_embeds.dtype, device=device)
    rows = torch.arange(batch, device=device)
    x = decoder.embed(tokens[:, :width], torch.zeros_like(rows), image_embeds, image_mask)
    hidden = decoder(x, cache, DecodeStep.prefill_rows(rows))[rows, lengths - 1]  # (B, D)

    done = torch.tensor([m <= 0 for m in max_new_tokens], device=device)
    looped: dict[int, int] = {}  # row -> number of new ids to keep
    for step in range(max(max_new_tokens)):
        logits = decoder.logits(hidden).float()  # (B, V)
        if step < min_new_tokens:
            logits[:, eos] = float("-inf")
        if no_repeat_ngram_size > 0:
            ban_repeated_ngrams(logits, tokens, lengths, no_repeat_ngram_size)
        next_ids = torch.where(done, pad_id, logits.argmax(-1))
        tokens[rows, lengths] = next_ids
        done = done | torch.isin(next_ids, eos) | (lengths + 1 >= limits)
        if step + 1 == max(max_new_tokens):
            break
        if loop_check is not None and (step + 1) % LOOP_CHECK_EVERY == 0:
            done = _stop_loops(tokens, lengths_host, prompts, done, looped, loop_check)
        if (step + 1) % DONE_CHECK_EVERY == 0 and bool(done.all()):
            break
        # Finished rows keep stepping on pad tokens (fixed shapes); their outputs are ignored.
        x = decoder.embed(next_ids[:, None], lengths)
        span = max(lengths_host) + 1
        hidden = decoder(x, cache, DecodeStep.decode_all(lengths, span))[:, 0]
        lengths = lengths + 1
        lengths_host = [n + 1 for n in lengths_host]

    results = []
    for b, p in enumerate(prompts):
        new = tokens[b, len(p.ids) : len(p.ids) + max_new_tokens[b]].tolist()
        if b in looped:
            results.append(Generated(new[: looped[b]], "loop"))
            continue
        stop = next((i for i, t in enumerate(new) if t in eos_ids), None)
        results.append(Generated(new[:stop], "eos") if stop is not None else Generated(new, "length"))
    return results


def _stop_loops(tokens, lengths_host, prompts, done, looped, loop_check) -> torch.Tensor:
    """Run loop_check on every unfinished row; mark looping rows done. One device-to-host copy."""
    active = (~done).tolist()
    if not any(active):
        return done
    host = tokens[:, : max(lengths_host) + 1].tolist()
    for b, p in enumerate(prompts):
        if active[b]:
            keep = loop_check(host[b][len(p.ids) : lengths_host[b] + 1])
            if keep is not None:
                looped[b] = keep
    if not looped:
        return done
    stopped = torch.zeros_like(done)
    stopped[list(looped)] = True
    return done | stopped


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
