"""Where decoding keeps its state: the preallocated KV cache (one slot per sequence) and the plan of
one forward pass (which slots, from which index, how far attention reads, with which mask)."""

from __future__ import annotations

import torch

from .layers import BlockMask, attention, flex_attention


class KVCache:
    """Preallocated keys and values for every layer, one row ("slot") per sequence.

    keys[layer] and values[layer] have shape (slots, heads, capacity, head_dim). Slot b holds its
    sequence's tokens at indices [0, lengths[b]); whatever lies past lengths[b] (right padding from a
    batched prefill, stale tokens of a finished sequence) is masked out and later overwritten.
    The lengths themselves belong to the generation loop (see StepPlan).

    static: the tensors keep fixed addresses for torch.compile, so a compiled decode step may write
    them inside a CUDA graph (mutating any other input makes torch skip the graph). Such a cache is
    meant to be kept and reused (`fits`): a new one means recompiling.
    """

    def __init__(self, layers: int, slots: int, heads: int, head_dim: int, capacity: int, *, dtype, device,
                 static: bool = False):
        shape = (slots, heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots, self.capacity = slots, capacity
        if static:
            for tensor in self.keys + self.values:
                torch._dynamo.mark_static_address(tensor)

    def fits(self, slots: int, capacity: int) -> bool:
        return slots <= self.slots and capacity <= self.capacity

    def update(self, layer: int, rows: torch.Tensor, start: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k/v (n, heads, T, head_dim) into slots rows (n,) at indices start[i] .. start[i]+T-1."""
        index = start.unsqueeze(1) + torch.arange(k.shape[2], device=k.device)  # (n, T)
        rows = rows.unsqueeze(1).expand_as(index)
        self.keys[layer][rows, :, index] = k.transpose(1, 2)
        self.values[layer][rows, :, index] = v.transpose(1, 2)


class StepPlan:
    """Where the tokens of one forward pass go in the cache.

    Prefill: `rows` (n,) are the cache slots receiving fresh prompts, written from index 0.
    Decode: each of the first n slots gets one token at index start[b] (its current length); `span`
    is a host-side bound on the longest slot after the step, so attention reads only the cache
    prefix [0, span), and `mask` (n, 1, 1, span) hides each slot's positions past its own length.
    flex: attend with FlexAttention and a block mask instead, which skips each slot's blocks past its
    own length (meant for a compiled step: run eagerly, FlexAttention materialises every score)."""

    def __init__(self, rows: torch.Tensor, start: torch.Tensor, *, prefill: bool, span: int = 0, flex: bool = False):
        self.rows, self.start, self.prefill, self.span = rows, start, prefill, span
        self.mask = None
        if not prefill:
            if flex:
                self.mask = length_block_mask(start, span)
            else:
                key_index = torch.arange(span, device=start.device)
                self.mask = (key_index[None, :] <= start[:, None])[:, None, None, :]

    @classmethod
    def prefill_rows(cls, rows: torch.Tensor) -> "StepPlan":
        return cls(rows, torch.zeros_like(rows), prefill=True)

    @classmethod
    def decode_all(cls, lengths: torch.Tensor, span: int, flex: bool = False) -> "StepPlan":
        return cls(torch.arange(lengths.shape[0], device=lengths.device), lengths, prefill=False, span=span, flex=flex)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Decode attention of q (n, H, 1, D) (already scaled) over the cache prefix (n, H, span, D)."""
        if isinstance(self.mask, torch.Tensor):
            return attention(q, keys, values, mask=self.mask, scale=1.0)
        return flex_attention(q, keys, values, block_mask=self.mask, scale=1.0)


FLEX_BLOCK = 128  # FlexAttention's key block; the CUDA span bucket (256) is a multiple of it


def length_block_mask(start: torch.Tensor, span: int) -> "BlockMask":
    """A FlexAttention block mask for one query per slot that sees keys [0, start[b]] of [0, span).

    Built from block counts, not by evaluating a mask over every position: slot b has
    (start[b] + 1) // FLEX_BLOCK full blocks (no masking inside) and, when its length is not a
    multiple of the block, one partial block, the next, where the mask applies. Blocks past those
    are never read."""
    # At least two block columns: a one-column mask would be compiled apart (torch specialises sizes
    # of 1), recompiling the step when the span passes one block. Columns past a slot's count are
    # unread, so one or two spare ones cost nothing. No max(): with a symbolic span, choosing its
    # branch narrows the span's range at the first call (to <= 256 where two columns won), and a
    # warm inductor cache turns that range into a guard, recompiling the step once mid-run.
    blocks = span // FLEX_BLOCK + 2
    n = start.shape[0]
    filled = start + 1
    full = torch.div(filled, FLEX_BLOCK, rounding_mode="floor").to(torch.int32)
    partial = (filled % FLEX_BLOCK != 0).to(torch.int32)
    order = torch.arange(blocks, device=start.device, dtype=torch.int32)
    # The partial block's index first; entries past a slot's count are ignored.
    partial_index = torch.clamp(full[:, None] + order[None, :], max=blocks - 1)

    def within_length(b, h, q_index, kv_index):
        return kv_index <= start[b]

    return BlockMask.from_kv_blocks(
        partial[:, None, None], partial_index[:, None, None, :],
        full[:, None, None], order.expand(n, blocks)[:, None, None, :].contiguous(),
        BLOCK_SIZE=FLEX_BLOCK, mask_mod=within_length, seq_lengths=(1, span),
    )
