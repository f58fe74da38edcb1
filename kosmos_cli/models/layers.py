"""Building blocks shared by Kosmos-2 and Kosmos-2.5: attention backends, norms, MLPs, positions,
the KV cache and the text decoder (both models use the same fairseq-style decoder)."""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# Attention backend, chosen with KOSMOS_ATTENTION:
#   auto (default): flash-attn for unmasked attention on CUDA GPUs that it supports (Ampere and
#         newer) when it is importable, SDPA otherwise, and FlexAttention for the compiled decode
#         step on the CPU (measured faster there) where this torch supports it;
#   sdpa: SDPA everywhere;
#   flex: as auto, and FlexAttention for the compiled decode step on CUDA too (an error where this
#         torch or the model's shapes do not allow it).
# FlexAttention reads only the cache blocks each slot has filled; SDPA reads every slot up to the
# longest one's span. Which is faster on a GPU is not measured yet, so auto keeps SDPA there.
# --------------------------------------------------------------------------------------------

try:  # pragma: no cover - flash-attn is an optional CUDA-only extra
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover
    _flash_attn_func = None

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - torch < 2.5
    BlockMask = flex_attention = None

ATTENTION_CHOICES = ("auto", "sdpa", "flex")
# The oldest torch whose FlexAttention decodes our shapes: before it, BlockMask.from_kv_blocks has no
# seq_lengths (2.5), head dim 96 is refused (2.6) and the decoding kernel fails on head dims that are
# not powers of two (until about 2.10).
FLEX_DECODING_TORCH = (2, 10)
FLEX_MIN_HEAD_DIM_CUDA = 16  # Triton's FlexAttention kernels


def attention_choice() -> str:
    choice = os.environ.get("KOSMOS_ATTENTION", "auto")
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"KOSMOS_ATTENTION={choice!r}: use one of {', '.join(ATTENTION_CHOICES)}")
    return choice


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def flex_unsupported(device: torch.device, head_dim: int) -> str | None:
    """Why FlexAttention cannot run the decode step here, or None when it can."""
    if flex_attention is None or torch_version() < FLEX_DECODING_TORCH:
        return (f"FlexAttention decoding needs torch >= {'.'.join(map(str, FLEX_DECODING_TORCH))} "
                f"(this is {torch.__version__})")
    if device.type == "cuda" and head_dim < FLEX_MIN_HEAD_DIM_CUDA:
        return f"FlexAttention on CUDA needs a head dim of at least {FLEX_MIN_HEAD_DIM_CUDA}, the model's is {head_dim}"
    return None


def flex_decoding(device: torch.device, head_dim: int) -> bool:
    """Whether the compiled decode step attends with FlexAttention (ValueError when asked for and
    not possible here)."""
    choice = attention_choice()
    if choice == "sdpa":
        return False
    reason = flex_unsupported(device, head_dim)
    if choice == "flex" and reason is not None:
        raise ValueError(f"KOSMOS_ATTENTION=flex: {reason}")
    return reason is None and (choice == "flex" or device.type == "cpu")


@functools.lru_cache(maxsize=None)
def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The GPU's compute capability, (8, 0) for an A100; asked once per device."""
    return torch.cuda.get_device_capability(device)


def flash_available(device: torch.device) -> bool:
    """flash-attn is installed, not switched off, and supports this GPU (Ampere and newer)."""
    return (_flash_attn_func is not None and attention_choice() != "sdpa" and device.type == "cuda"
            and cuda_capability(device) >= (8, 0))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q: (B, H, Tq, D), k/v: (B, H, Tk, D), mask: bool (B, 1, Tq|1, Tk), True = attend. -> (B, H, Tq, D)."""
    if mask is None and q.dtype in (torch.float16, torch.bfloat16) and flash_available(q.device):
        # flash-attn wants (B, T, H, D).
        out = _flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, softmax_scale=scale
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


# --------------------------------------------------------------------------------------------
# Norms, activations, MLPs
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """T5-style norm: no mean subtraction, no bias, variance computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(self.weight.dtype)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "relu": F.relu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation function {name!r} in config.json") from None


class FFN(nn.Module):
    """Kosmos text FFN: fc1 -> act -> LayerNorm(ffn_dim) -> fc2."""

    def __init__(self, dim: int, ffn_dim: int, act: str, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim, eps=eps)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_layernorm(self.act(self.fc1(x))))


# --------------------------------------------------------------------------------------------
# Multi-head attention with separate q/k/v/out projections (the checkpoint layout).
# --------------------------------------------------------------------------------------------


class MultiheadAttention(nn.Module):
    """Self- or cross-attention. `inner_norm` adds Kosmos-2's LayerNorm over the merged heads."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, bias: bool, inner_norm_eps: float | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.q_proj = nn.Linear(dim, inner, bias=bias)
        self.k_proj = nn.Linear(dim, inner, bias=bias)
        self.v_proj = nn.Linear(dim, inner, bias=bias)
        self.inner_attn_ln = nn.LayerNorm(inner, eps=inner_norm_eps) if inner_norm_eps is not None else None
        self.out_proj = nn.Linear(inner, dim, bias=bias)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H*D) -> (B, H, T, D)."""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) -> (B, T, H*D), then the optional inner norm and the output projection."""
        x = x.transpose(1, 2).flatten(2)
        if self.inner_attn_ln is not None:
            x = self.inner_attn_ln(x)
        return self.out_proj(x)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Uncached attention of x (B, T, dim) over context (B, S, dim) (x itself when None)."""
        context = x if context is None else context
        q = self.split(self.q_proj(x) * self.head_dim**-0.5)
        k, v = self.split(self.k_proj(context)), self.split(self.v_proj(context))
        return self.merge(attention(q, k, v, mask=mask, scale=1.0))


class Resampler(nn.Module):
    """Q learned latent queries attend (no mask, not causal) over [dense(features); latent queries]."""

    def __init__(self, vision_dim: int, dim: int, heads: int, queries: int):
        super().__init__()
        self.dense = nn.Linear(vision_dim, dim)
        self.latent_query = nn.Parameter(torch.empty(queries, dim))
        self.x_attn = MultiheadAttention(dim, heads, dim // heads, bias=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dense(features)
        queries = self.latent_query.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.x_attn(queries, context=torch.cat([x, queries], dim=1))


# --------------------------------------------------------------------------------------------
# Fairseq sinusoidal positions
# --------------------------------------------------------------------------------------------


def sinusoidal_positions(positions: torch.Tensor, dim: int, padding_idx: int) -> torch.Tensor:
    """positions (...) int -> (..., dim) float32; [sin | cos] halves, the padding position is zero.

    Computed on the fly so any position works, including past max_position_embeddings."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=positions.device).float() * -(math.log(10000) / (half - 1)))
    angles = positions.float().unsqueeze(-1) * freq
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.masked_fill((positions == padding_idx).unsqueeze(-1), 0.0)


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys and values for every layer, one row ("slot") per sequence.

    keys[layer] and values[layer] have shape (slots, heads, capacity, head_dim). Slot b holds its
    sequence's tokens at indices [0, lengths[b]); whatever lies past lengths[b] (right padding from a
    batched prefill, stale tokens of a finished sequence) is masked out and later overwritten.
    The lengths themselves belong to the generation loop (see DecodeStep).

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

    def update(self, layer: int, step: "DecodeStep", k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k/v (n, heads, T, head_dim) of the step's rows at indices start[i] .. start[i]+T-1."""
        index = step.start.unsqueeze(1) + torch.arange(k.shape[2], device=k.device)  # (n, T)
        rows = step.rows.unsqueeze(1).expand_as(index)
        self.keys[layer][rows, :, index] = k.transpose(1, 2)
        self.values[layer][rows, :, index] = v.transpose(1, 2)


# --------------------------------------------------------------------------------------------
# The fairseq-style text decoder used by both models
# --------------------------------------------------------------------------------------------


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, act: str, eps: float, inner_norm: bool):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.self_attn = MultiheadAttention(dim, heads, dim // heads, bias=True, inner_norm_eps=eps if inner_norm else None)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = FFN(dim, ffn_dim, act, eps)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, step: "DecodeStep") -> torch.Tensor:
        attn = self.self_attn
        h = self.self_attn_layer_norm(x)
        # Scaled after the split (same values): compiled for the CPU, FlexAttention needs the query
        # to be a 4-D buffer of its own, not a view of the projection (torch 2.13's lowering fails).
        q = attn.split(attn.q_proj(h)) * attn.head_dim**-0.5
        k, v = attn.split(attn.k_proj(h)), attn.split(attn.v_proj(h))
        cache.update(layer, step, k, v)
        if step.prefill:
            # Fresh prompts, right-padded: causal attention over themselves (pads come last).
            out = attention(q, k, v, causal=True, scale=1.0)
        else:
            # One new token in each of the first n slots: read only the cache prefix they use.
            n = step.start.shape[0]
            out = step.attend(q, cache.keys[layer][:n, :, : step.span], cache.values[layer][:n, :, : step.span])
        x = x + attn.merge(out)
        return x + self.ffn(self.final_layer_norm(x))


class DecodeStep:
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
    def prefill_rows(cls, rows: torch.Tensor) -> "DecodeStep":
        return cls(rows, torch.zeros_like(rows), prefill=True)

    @classmethod
    def decode_all(cls, lengths: torch.Tensor, span: int, flex: bool = False) -> "DecodeStep":
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
    # of 1), recompiling the step when the span passes one block. Columns past a slot's count are unread.
    blocks = max(-(-span // FLEX_BLOCK), 2)
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


class TextDecoder(nn.Module):
    """Token embedding (+ optional segment embedding), pre-LN blocks, final norm and LM head."""

    def __init__(self, *, vocab_size, dim, layers, heads, ffn_dim, act, eps, pad_id, scale_embedding, segments, inner_norm, tie):
        super().__init__()
        self.dim, self.heads, self.pad_id = dim, heads, pad_id
        self.embed_scale = math.sqrt(dim) if scale_embedding else 1.0
        self.embed_tokens = nn.Embedding(vocab_size, dim)
        self.segment_emb = nn.Embedding(2, dim) if segments else None
        self.layers = nn.ModuleList(DecoderBlock(dim, heads, ffn_dim, act, eps, inner_norm) for _ in range(layers))
        self.layer_norm = nn.LayerNorm(dim, eps=eps)
        # A tied head reuses embed_tokens.weight and has no parameter of its own.
        self.lm_head = None if tie else nn.Linear(dim, vocab_size, bias=False)

    @classmethod
    def from_config(cls, t, *, segments: bool, inner_norm: bool, tie: bool) -> "TextDecoder":
        """From a config.TextConfig; segments: Kosmos-2.5's segment embedding; inner_norm: Kosmos-2's
        LayerNorm over the merged heads; tie: the head reuses embed_tokens."""
        return cls(
            vocab_size=t.vocab_size, dim=t.embed_dim, layers=t.layers, heads=t.attention_heads, ffn_dim=t.ffn_dim,
            act=t.activation_function, eps=t.layer_norm_eps, pad_id=t.pad_token_id, scale_embedding=t.scale_embedding,
            segments=segments, inner_norm=inner_norm, tie=tie,
        )

    def new_cache(self, slots: int, capacity: int, *, dtype, device, static: bool = False) -> KVCache:
        return KVCache(len(self.layers), slots, self.heads, self.dim // self.heads, capacity, dtype=dtype,
                       device=device, static=static)

    def embed(
        self, ids: torch.Tensor, start: torch.Tensor, image: torch.Tensor | None = None, image_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ids (n, T); start (n,) index of ids[:, 0] in its sequence; image (n, Q, dim) features to put
        where image_mask (n, T) == 1. Image features go in before the sqrt(dim) scaling, as trained."""
        x = self.embed_tokens(ids)
        if image is not None:
            x = x.clone()
            x[image_mask == 1] = image.to(x.dtype).reshape(-1, x.shape[-1])
        x = x * self.embed_scale
        # Prompts carry no padding, so the fairseq position of index i is i + pad_id + 1.
        positions = start.unsqueeze(1) + torch.arange(ids.shape[1], device=ids.device) + self.pad_id + 1
        x = x + sinusoidal_positions(positions, self.dim, self.pad_id).to(x.dtype)
        if self.segment_emb is not None:
            segment = (image_mask != 0).long() if image_mask is not None else torch.zeros_like(ids)
            x = x + self.segment_emb(segment)
        return x

    def forward(self, x: torch.Tensor, cache: KVCache, step: DecodeStep) -> torch.Tensor:
        """x (n, T, dim) embedded tokens -> hidden states after the final norm (n, T, dim)."""
        for i, block in enumerate(self.layers):
            x = block(x, i, cache, step)
        return self.layer_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)
